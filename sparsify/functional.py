"""``block_ell_linear``: what ``BlockSparseLinear.forward`` calls, the cheapest correct route to the kernels.

Under ``torch.compile``, ``torch.export``, FX tracing, fake tensors, tensor subclasses, functorch
transforms or any torch-function / dispatch mode (``ops.plain_eager``), it calls the registered custom
op ``torch.ops.sparsify.block_ell_linear`` (one opaque graph node; see ops.py). In plain eager mode, on
plain tensors, it runs the *same* forward and backward code (ops.forward_impl, ops.backward_grads)
through a ``torch.autograd.Function`` instead, skipping the Python dispatcher round trips of a
``torch.library.custom_op`` (measured on an H100: most of the 200-345 us of host time a layer call
cost; benchmarks/NOTES.md). Both routes give bitwise-identical outputs and gradients
(tests/test_functional.py checks it), to every order of derivative.
"""

from __future__ import annotations

import torch

from sparsify import ops


class _BlockEllLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, col_indices, bias, stats_probe):
        ops.save_for_backward(ctx, x, values, col_indices, bias, stats_probe)
        return ops.forward_impl(x, values, col_indices, bias, stats_probe)

    @staticmethod
    def backward(ctx, grad_y):
        if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable themselves
            return ops.backward_through_ops(ctx, grad_y)
        return ops.backward_grads(ctx, grad_y, ops.grad_input_impl, ops.grad_values_impl)


_apply = ops.eager_apply(_BlockEllLinear)  # _BlockEllLinear.apply, less its per-call Python wrapper


def block_ell_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    col_indices: torch.Tensor,
    bias: torch.Tensor | None = None,
    stats_probe: torch.Tensor | None = None,
    *,
    in_features: int | None = None,
) -> torch.Tensor:
    """y = x W^T + bias with W = (values [R, K, B, B], col_indices [R, K]); x is [..., in_features].
    ``stats_probe`` (float32 or float64 [R + C], requires grad) receives the topology statistics as its gradient.
    ``in_features`` (C * B), where the caller knows it, is checked against the input's width (the
    op itself knows C only from the stats probe)."""
    if in_features is not None and x.dim() and x.shape[-1] != in_features:
        ops.check_width(x, values, in_features // values.shape[-1])
    if not ops.plain_eager((x, values, col_indices, bias, stats_probe)):
        return torch.ops.sparsify.block_ell_linear(x, values, col_indices, bias, stats_probe)
    x, values, bias = ops.autocast_inputs(x, values, bias)
    if torch.is_grad_enabled() and (
        x.requires_grad or values.requires_grad or (bias is not None and bias.requires_grad)
        or (stats_probe is not None and stats_probe.requires_grad)
    ):
        return _apply(x, values, col_indices, bias, stats_probe)
    return ops.forward_impl(x, values, col_indices, bias, stats_probe)
