"""``block_ell_linear``: what ``BlockSparseLinear.forward`` calls, the cheapest correct route to the kernels.

Under ``torch.compile``, ``torch.export``, FX tracing, fake tensors, tensor subclasses, functorch
transforms or any torch-function / dispatch mode, it calls the registered custom op
``torch.ops.sparsify.block_ell_linear`` (one opaque graph node; see ops.py). In plain eager mode, on
plain tensors, it runs the *same* forward and backward code (ops.forward_impl, ops.backward_grads)
through a ``torch.autograd.Function`` instead, skipping the Python dispatcher round trips of a
``torch.library.custom_op`` (measured on an H100: most of the 200-345 us of host time a layer call
cost; benchmarks/NOTES.md). Both routes give bitwise-identical outputs and gradients
(tests/test_ops.py checks it).
"""

from __future__ import annotations

import torch
from torch import nn

from sparsify import ops

_PLAIN = (torch.Tensor, nn.Parameter)


class _BlockEllLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, col_indices, bias, stats_probe):
        ops.save_for_backward(ctx, x, values, col_indices, bias, stats_probe)
        return ops.forward_impl(x, values, col_indices, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        return ops.backward_grads(ctx, grad_y, ops.grad_input_impl, ops.grad_values_impl)


def _plain_eager(tensors) -> bool:
    """True where nothing but eager PyTorch on ordinary tensors would see this call."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._are_functorch_transforms_active():
        return False
    return all(t is None or t.__class__ in _PLAIN for t in tensors)


def block_ell_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    col_indices: torch.Tensor,
    bias: torch.Tensor | None = None,
    stats_probe: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x W^T + bias with W = (values [R, K, B, B], col_indices [R, K]); x is [..., in_features].
    ``stats_probe`` (float32 [R + C], requires grad) receives the topology statistics as its gradient."""
    if not _plain_eager((x, values, col_indices, bias, stats_probe)):
        return torch.ops.sparsify.block_ell_linear(x, values, col_indices, bias, stats_probe)
    x, values, bias = ops.autocast_inputs(x, values, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, values, bias, stats_probe)):
        return _BlockEllLinear.apply(x, values, col_indices, bias, stats_probe)
    return ops.forward_impl(x, values, col_indices, bias)
