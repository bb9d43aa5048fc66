"""The Block-ELL custom ops, registered with ``torch.library``.

    torch.ops.sparsify.block_ell_linear(x, values, col_indices, bias=None, stats_probe=None) -> y
    torch.ops.sparsify.block_ell_grad_input(grad_out, values, col_indices, in_features) -> grad_x
    torch.ops.sparsify.block_ell_grad_values(grad_out, x, col_indices, block_size) -> grad_values

Each op has a fake (meta) function, so ``torch.compile`` and ``torch.export`` see a single opaque
node: no graph breaks, and new topology *values* never recompile (only shapes are guarded).
``block_ell_linear`` has autograd (grads for x, values, bias) and autocast like ``nn.Linear``.

``stats_probe`` is how the topology optimizer reads activation and error statistics without hooks:
a float32 tensor ``[R + C]`` that requires grad. Its "gradient" is defined as the per-block-row sum
of squared output gradients (first R entries) and the per-block-column sum of squared inputs (last
C entries), so the statistics accumulate exactly like gradients under gradient accumulation.

Backends: ``SPARSIFY_BACKEND=reference|triton|auto`` (default ``auto``: Triton for CUDA tensors,
the PyTorch reference otherwise). ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import functools
import os
from types import SimpleNamespace

import torch

from sparsify.kernels import load_triton, reference

BACKENDS = ("auto", "reference", "triton")


def backend_name(device: torch.device) -> str:
    """The backend that runs on ``device`` under the current ``SPARSIFY_BACKEND``."""
    choice = os.environ.get("SPARSIFY_BACKEND", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"SPARSIFY_BACKEND={choice!r} is not one of {BACKENDS}; unset it or pick one of those")
    if choice == "auto":
        return "triton" if device.type == "cuda" and triton_kernels() is not None else "reference"
    if choice == "triton" and triton_kernels() is None:
        raise RuntimeError("SPARSIFY_BACKEND=triton but the Triton kernels cannot be imported; install triton")
    return choice


@functools.cache
def triton_kernels() -> SimpleNamespace | None:
    """The Triton launchers, or None where they cannot be imported."""
    try:
        return load_triton()
    except ImportError:
        return None


def _kernels_for(device: torch.device):
    return triton_kernels() if backend_name(device) == "triton" else reference


def _check_operands(x: torch.Tensor, values: torch.Tensor, col_indices: torch.Tensor, bias: torch.Tensor | None) -> None:
    if values.dim() != 4 or values.shape[2] != values.shape[3]:
        raise ValueError(f"block_ell_linear: values must have shape [R, K, B, B], got {tuple(values.shape)}")
    if col_indices.shape != values.shape[:2]:
        raise ValueError(
            f"block_ell_linear: col_indices has shape {tuple(col_indices.shape)} but values imply {tuple(values.shape[:2])}"
        )
    if col_indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_ell_linear: col_indices must be int32, got {col_indices.dtype}")
    block_size = values.shape[2]
    if x.dim() == 0 or x.shape[-1] % block_size:
        raise ValueError(
            f"block_ell_linear: input's last dimension {tuple(x.shape)[-1:]} is not a multiple of block_size={block_size}"
        )
    if x.dtype != values.dtype:
        raise ValueError(
            f"block_ell_linear: input dtype {x.dtype} differs from weight dtype {values.dtype}; "
            "cast one of them, or run under torch.autocast"
        )
    out_features = values.shape[0] * block_size
    if bias is not None and (bias.shape != (out_features,) or bias.dtype != x.dtype):
        raise ValueError(
            f"block_ell_linear: bias must be [{out_features}] of dtype {x.dtype}, got {tuple(bias.shape)} {bias.dtype}"
        )


def _check_indices_in_range(col_indices: torch.Tensor, num_cols: int) -> None:
    # A device check would synchronize; only the host copy is checked (the kernels never read
    # out of bounds for a valid topology, and load_state_dict validates every topology it loads).
    if col_indices.device.type == "cpu" and col_indices.numel():
        low, high = int(col_indices.min()), int(col_indices.max())
        if low < 0 or high >= num_cols:
            raise ValueError(
                f"block_ell_linear: col_indices hold values in [{low}, {high}] outside [0, {num_cols}); "
                "the topology does not belong to this input width"
            )


def forward_impl(
    x: torch.Tensor, values: torch.Tensor, col_indices: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The forward computation behind the op (and behind ``functional``'s eager path): validate, run the kernel."""
    _check_operands(x, values, col_indices, bias)
    in_features = x.shape[-1]
    _check_indices_in_range(col_indices, in_features // values.shape[2])
    x2 = x.reshape(-1, in_features)
    out_features = values.shape[0] * values.shape[2]
    if x2.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], out_features)
    y = _kernels_for(x.device).forward(x2.contiguous(), values.contiguous(), col_indices.contiguous(), bias)
    return y.view(*x.shape[:-1], out_features)


def grad_input_impl(grad_out: torch.Tensor, values: torch.Tensor, col_indices: torch.Tensor, in_features: int) -> torch.Tensor:
    if grad_out.shape[0] == 0:
        return grad_out.new_zeros(0, in_features)
    kernels = _kernels_for(grad_out.device)
    return kernels.grad_input(grad_out.contiguous(), values.contiguous(), col_indices.contiguous(), in_features)


def grad_values_impl(grad_out: torch.Tensor, x: torch.Tensor, col_indices: torch.Tensor, block_size: int) -> torch.Tensor:
    rows, k = col_indices.shape
    if grad_out.shape[0] == 0:
        return grad_out.new_zeros(rows, k, block_size, block_size)
    kernels = _kernels_for(grad_out.device)
    return kernels.grad_values(grad_out.contiguous(), x.contiguous(), col_indices.contiguous(), block_size)


@torch.library.custom_op("sparsify::block_ell_linear", mutates_args=())
def block_ell_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    col_indices: torch.Tensor,
    bias: torch.Tensor | None = None,
    stats_probe: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x W^T + bias with W in Block-ELL form; x is [..., in_features]."""
    return forward_impl(x, values, col_indices, bias)


@block_ell_linear.register_fake
def _(x, values, col_indices, bias=None, stats_probe=None):
    _check_operands(x, values, col_indices, bias)
    return x.new_empty(*x.shape[:-1], values.shape[0] * values.shape[2])


@torch.library.custom_op("sparsify::block_ell_grad_input", mutates_args=())
def block_ell_grad_input(
    grad_out: torch.Tensor, values: torch.Tensor, col_indices: torch.Tensor, in_features: int
) -> torch.Tensor:
    """grad_out [M, out] -> dL/dx [M, in]."""
    return grad_input_impl(grad_out, values, col_indices, in_features)


@block_ell_grad_input.register_fake
def _(grad_out, values, col_indices, in_features):
    return grad_out.new_empty(grad_out.shape[0], in_features)


@torch.library.custom_op("sparsify::block_ell_grad_values", mutates_args=())
def block_ell_grad_values(
    grad_out: torch.Tensor, x: torch.Tensor, col_indices: torch.Tensor, block_size: int
) -> torch.Tensor:
    """grad_out [M, out], x [M, in] -> dL/dvalues [R, K, B, B]."""
    return grad_values_impl(grad_out, x, col_indices, block_size)


@block_ell_grad_values.register_fake
def _(grad_out, x, col_indices, block_size):
    return grad_out.new_empty(col_indices.shape[0], col_indices.shape[1], block_size, block_size)


def save_for_backward(ctx, x, values, col_indices, bias, stats_probe) -> None:
    """What the backward needs, on an autograd context (the op's and ``functional``'s)."""
    ctx.save_for_backward(x, values, col_indices)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.probe_dtype = stats_probe.dtype if stats_probe is not None else None


def _setup_context(ctx, inputs, output):
    save_for_backward(ctx, *inputs)


def _block_norms(t: torch.Tensor, num_blocks: int, block_size: int) -> torch.Tensor:
    """L2 norm over tokens and block width of every block of columns of t [M, num_blocks * B], float32."""
    return torch.linalg.vector_norm(t.reshape(-1, num_blocks, block_size), dim=(0, 2), dtype=torch.float32)


def backward_grads(ctx, grad_y, grad_input_fn, grad_values_fn) -> tuple:
    """Gradients for (x, values, col_indices, bias, stats_probe), trimmed to the inputs the context saw.
    ``grad_input_fn`` / ``grad_values_fn`` compute the two products (the ops, or their impls directly)."""
    x, values, col_indices = ctx.saved_tensors
    rows, _, block_size, _ = values.shape
    in_features = x.shape[-1]
    grad_2d = grad_y.reshape(-1, rows * block_size)
    x_2d = x.reshape(-1, in_features)
    grad_x = grad_values = grad_bias = grad_probe = None
    needs = ctx.needs_input_grad + (False,) * (5 - len(ctx.needs_input_grad))  # trailing defaults may be absent
    if needs[0]:
        grad_x = grad_input_fn(grad_2d, values, col_indices, in_features).view(x.shape)
    if needs[1]:
        grad_values = grad_values_fn(grad_2d, x_2d, col_indices, block_size).to(values.dtype)
    if ctx.has_bias and needs[3]:
        grad_bias = grad_2d.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
    if needs[4]:
        # One fused reduction per tensor (no float32 copies of x or grad_out): norms, then squared.
        error_energy = _block_norms(grad_2d, rows, block_size).square()  # [R]
        activation_energy = _block_norms(x_2d, in_features // block_size, block_size).square()  # [C]
        grad_probe = torch.cat([error_energy, activation_energy]).to(ctx.probe_dtype)
    return (grad_x, grad_values, None, grad_bias, grad_probe)[: len(ctx.needs_input_grad)]


def _backward(ctx, grad_y):
    ops = torch.ops.sparsify
    return backward_grads(ctx, grad_y, ops.block_ell_grad_input, ops.block_ell_grad_values)


block_ell_linear.register_autograd(_backward, setup_context=_setup_context)


def _autocast_cast(t: torch.Tensor | None, device_type: str) -> torch.Tensor | None:
    dtype = torch.get_autocast_dtype(device_type)
    return t.to(dtype) if t is not None and t.is_floating_point() and t.device.type == device_type else t


def autocast_inputs(x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    """(x, values, bias) cast to the autocast dtype in force on x's device, like ``nn.Linear``; unchanged
    outside autocast. The op's autocast kernels and ``functional``'s eager path both use it."""
    device_type = x.device.type
    if device_type not in AUTOCAST_DEVICES or not torch.is_autocast_enabled(device_type):
        return x, values, bias
    return _autocast_cast(x, device_type), _autocast_cast(values, device_type), _autocast_cast(bias, device_type)


AUTOCAST_DEVICES = ("cpu", "cuda")


def _register_autocast(device_type: str) -> None:
    """Autocast like ``nn.Linear``: floating inputs are cast to the autocast dtype in force."""
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    key = getattr(torch._C.DispatchKey, key_name)
    op = torch.ops.sparsify.block_ell_linear.default

    def autocast_impl(x, values, col_indices, bias=None, stats_probe=None):
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            cast = [_autocast_cast(t, device_type) for t in (x, values, bias)]
            return op(cast[0], cast[1], col_indices, cast[2], stats_probe)

    if op.has_kernel_for_dispatch_key(key):
        op.py_kernels.pop(key)
    op.py_impl(key)(autocast_impl)
    _autocast_library.impl("block_ell_linear", lambda _, *args: autocast_impl(*args), key_name, with_keyset=True)


_autocast_library = torch.library.Library("sparsify", "FRAGMENT")
for _device_type in AUTOCAST_DEVICES:
    _register_autocast(_device_type)
