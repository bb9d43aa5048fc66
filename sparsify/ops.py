"""The Block-ELL custom ops, registered with ``torch.library``; read top to bottom: checks, the
computation, schemas and fakes, autograd, autocast.

    torch.ops.sparsify.block_ell_linear(x, values, col_indices, bias=None, stats_probe=None) -> y
    torch.ops.sparsify.block_ell_grad_input(grad_out, values, col_indices, in_features) -> grad_x
    torch.ops.sparsify.block_ell_grad_values(grad_out, x, col_indices, block_size) -> grad_values

Each op has a fake (meta) function, so ``torch.compile`` and ``torch.export`` see a single opaque
node: no graph breaks, and new topology *values* never recompile (only shapes are guarded).
``block_ell_linear`` has autograd (grads for x, values, bias, to any order: the two gradient ops have
autograd too) and autocast like ``nn.Linear``.

``stats_probe`` is how the topology optimizer reads activation and error statistics without hooks:
a float32 (float64 once a TopologyOptimizer enables it) tensor ``[R + C]`` that requires grad. Its "gradient" is defined as the per-block-row sum
of squared output gradients (first R entries) and the per-block-column sum of squared inputs (last
C entries), so the statistics accumulate exactly like gradients under gradient accumulation.

Which kernels run (the PyTorch reference, the Triton kernels and their variants): ``kernels/dispatch.py``
(``sparsify.kernel_options(backend=...)``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sparsify.kernels.dispatch import backend_for, kernels_for, triton_kernels  # noqa: F401  (re-exported)

# Kept for scripts that import them from here (benchmarks): sparsify.ops.backend_name(device) and
# sparsify.ops.triton_kernels(); the public names are sparsify.kernels.dispatch.backend_for / triton_kernels.
backend_name = backend_for


# ---------------------------------------------------------------------------------------------------
# Checks: every rejected call raises before anything runs. Shapes, dtypes and devices are checked
# everywhere (also in the fakes, so compile and export see the same errors); column values only on
# CPU tensors, where reading them costs no synchronization (on CUDA the Triton forward asserts on
# the device, see kernels/column_check.py).


def _fail(message: str) -> None:
    raise ValueError(f"block_ell_linear: {message}")


_INDEX_DTYPES = (torch.int32, torch.int64)


def _check_operands(x, values, col_indices, bias, stats_probe=None) -> None:
    # Runs on every call (host time counts at decode sizes): each attribute is read once, and the
    # messages are built only on failure.
    values_shape = values.shape
    if len(values_shape) != 4 or values_shape[2] != values_shape[3]:
        _fail(f"values must have shape [R, K, B, B], got {tuple(values_shape)}")
    if col_indices.shape != values_shape[:2]:
        _fail(f"col_indices has shape {tuple(col_indices.shape)} but values imply {tuple(values_shape[:2])}")
    if col_indices.dtype not in _INDEX_DTYPES:
        _fail(f"col_indices must be int32, got {col_indices.dtype}")
    dtype = x.dtype
    if not (dtype.is_floating_point and values.dtype.is_floating_point):  # complex dtypes are not floating
        _fail(f"input and weight must be real floating point, got {dtype} and {values.dtype}")
    block_rows, _, block_size, _ = values_shape
    x_shape = x.shape
    if not x_shape or x_shape[-1] % block_size:
        _fail(f"input's last dimension {tuple(x_shape)[-1:]} is not a multiple of block_size={block_size}")
    if dtype != values.dtype:
        _fail(
            f"input dtype {dtype} differs from weight dtype {values.dtype}; cast one of them, or run under torch.autocast"
        )
    out_features = block_rows * block_size
    if bias is not None and (bias.shape != (out_features,) or bias.dtype != dtype):
        _fail(f"bias must be [{out_features}] of dtype {dtype}, got {tuple(bias.shape)} {bias.dtype}")
    device = x.device
    if (values.device != device or col_indices.device != device or (bias is not None and bias.device != device)
            or (stats_probe is not None and stats_probe.device != device)):
        for name, t in (("values", values), ("col_indices", col_indices), ("bias", bias), ("stats_probe", stats_probe)):
            if t is not None and t.device != device:
                _fail(f"{name} is on {t.device} but the input is on {device}; move them to one device")
    if stats_probe is not None:
        check_width(x, values, stats_probe.numel() - block_rows)


def check_width(x: torch.Tensor, values: torch.Tensor, num_cols: int) -> None:
    """The input's width against the weight's C*B (C known from the caller or the stats probe's R + C)."""
    block_size = values.shape[2]
    if x.shape[-1] != num_cols * block_size:
        _fail(
            f"input has {x.shape[-1]} features but the weight expects {num_cols * block_size} "
            f"(= C * B = {num_cols} * {block_size})"
        )


def _check_indices_in_range(col_indices: torch.Tensor, num_cols: int) -> None:
    if col_indices.is_cpu and col_indices.numel():
        low, high = int(col_indices.min()), int(col_indices.max())
        if low < 0 or high >= num_cols:
            _fail(
                f"col_indices hold values in [{low}, {high}] outside [0, {num_cols}); "
                "the topology does not belong to this input width"
            )


# ---------------------------------------------------------------------------------------------------
# The computation behind the ops (and behind ``functional``'s eager route).


def forward_impl(
    x: torch.Tensor, values: torch.Tensor, col_indices: torch.Tensor, bias: torch.Tensor | None, stats_probe=None
) -> torch.Tensor:
    """Validate, run the forward kernel. The result is a fresh tensor (the kernel writes a 2-D view of
    it), never a view, so that it can be modified in place like nn.Linear's."""
    _check_operands(x, values, col_indices, bias, stats_probe)
    x_shape = x.shape
    in_features = x_shape[-1]
    block_rows, _, block_size, _ = values.shape
    _check_indices_in_range(col_indices, in_features // block_size)
    out_features = block_rows * block_size
    y = x.new_empty(*x_shape[:-1], out_features)
    flat = len(x_shape) == 2  # the usual case: no 2-D views to make (an op each)
    x2 = x if flat else x.reshape(-1, in_features)
    if x2.shape[0]:
        y2 = y if flat else y.view(-1, out_features)
        kernels_for(x.device).forward(x2.contiguous(), values.contiguous(), col_indices.contiguous(), bias, out=y2)
    return y


def _check_grad_operands(grad_out, values_or_x, col_indices, name: str) -> None:
    device = grad_out.device
    if col_indices.device != device or values_or_x.device != device:
        raise ValueError(f"{name}: grad_out, col_indices and the other operand must share one device")


def grad_input_impl(grad_out: torch.Tensor, values: torch.Tensor, col_indices: torch.Tensor, in_features: int):
    _check_grad_operands(grad_out, values, col_indices, "block_ell_grad_input")
    _check_indices_in_range(col_indices, in_features // values.shape[2])
    if grad_out.shape[0] == 0:
        return grad_out.new_zeros(0, in_features)
    kernels = kernels_for(grad_out.device)
    return kernels.grad_input(grad_out.contiguous(), values.contiguous(), col_indices.contiguous(), in_features)


def grad_values_impl(grad_out: torch.Tensor, x: torch.Tensor, col_indices: torch.Tensor, block_size: int):
    _check_grad_operands(grad_out, x, col_indices, "block_ell_grad_values")
    _check_indices_in_range(col_indices, x.shape[-1] // block_size)  # a negative column would wrap
    block_rows, k = col_indices.shape
    if grad_out.shape[0] == 0:
        return grad_out.new_zeros(block_rows, k, block_size, block_size)
    kernels = kernels_for(grad_out.device)
    return kernels.grad_values(grad_out.contiguous(), x.contiguous(), col_indices.contiguous(), block_size)


# ---------------------------------------------------------------------------------------------------
# Schemas and fakes.


@torch.library.custom_op("sparsify::block_ell_linear", mutates_args=())
def block_ell_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    col_indices: torch.Tensor,
    bias: torch.Tensor | None = None,
    stats_probe: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x W^T + bias with W in Block-ELL form; x is [..., in_features]."""
    return forward_impl(x, values, col_indices, bias, stats_probe)


@block_ell_linear.register_fake
def _(x, values, col_indices, bias=None, stats_probe=None):
    _check_operands(x, values, col_indices, bias, stats_probe)
    return x.new_empty(*x.shape[:-1], values.shape[0] * values.shape[2])


@torch.library.custom_op("sparsify::block_ell_grad_input", mutates_args=())
def block_ell_grad_input(
    grad_out: torch.Tensor, values: torch.Tensor, col_indices: torch.Tensor, in_features: int
) -> torch.Tensor:
    """grad_out [M, out] -> dL/dx [M, in]."""
    return grad_input_impl(grad_out, values, col_indices, in_features)


@block_ell_grad_input.register_fake
def _(grad_out, values, col_indices, in_features):
    _check_grad_operands(grad_out, values, col_indices, "block_ell_grad_input")
    return grad_out.new_empty(grad_out.shape[0], in_features)


@torch.library.custom_op("sparsify::block_ell_grad_values", mutates_args=())
def block_ell_grad_values(
    grad_out: torch.Tensor, x: torch.Tensor, col_indices: torch.Tensor, block_size: int
) -> torch.Tensor:
    """grad_out [M, out], x [M, in] -> dL/dvalues [R, K, B, B]."""
    return grad_values_impl(grad_out, x, col_indices, block_size)


@block_ell_grad_values.register_fake
def _(grad_out, x, col_indices, block_size):
    _check_grad_operands(grad_out, x, col_indices, "block_ell_grad_values")
    return grad_out.new_empty(col_indices.shape[0], col_indices.shape[1], block_size, block_size)


# ---------------------------------------------------------------------------------------------------
# Autograd. The forward's backward is written once for both routes (the op's and functional's eager
# Function); it calls the two gradient ops, whose own autograd (below) makes every order of
# derivative exact: grad_input and grad_values are bilinear, their derivatives are the forward and
# each other.


def save_for_backward(ctx, x, values, col_indices, bias, stats_probe) -> None:
    """What the backward needs, on an autograd context (the op's and ``functional``'s)."""
    ctx.save_for_backward(x, values, col_indices)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.probe_dtype = stats_probe.dtype if stats_probe is not None else None


def _setup_context(ctx, inputs, output):
    save_for_backward(ctx, *inputs)


def _block_norms(t: torch.Tensor, num_blocks: int, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """L2 norm over tokens and block width of every block of columns of t [M, num_blocks * B], in ``dtype``."""
    return torch.linalg.vector_norm(t.reshape(-1, num_blocks, block_size), dim=(0, 2), dtype=dtype)


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """``torch.promote_types(dtype, torch.float32)`` for floating ``dtype``, without an op call."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, without the dispatcher trip where it already has that dtype (the usual case)."""
    return t if t.dtype == dtype else t.to(dtype)


def backward_grads(ctx, grad_y, grad_input_fn, grad_values_fn) -> tuple:
    """Gradients for (x, values, col_indices, bias, stats_probe), trimmed to the inputs the context saw.
    ``grad_input_fn`` / ``grad_values_fn`` compute the two products (the ops, or their impls directly)."""
    x, values, col_indices = ctx.saved_tensors
    block_rows, _, block_size, _ = values.shape
    in_features = x.shape[-1]
    flat = x.dim() == 2 and grad_y.dim() == 2  # the usual case: no 2-D views to make (an op each)
    grad_2d = grad_y if flat else grad_y.reshape(-1, block_rows * block_size)
    x_2d = x if flat else x.reshape(-1, in_features)
    grad_x = grad_values = grad_bias = grad_probe = None
    needs = ctx.needs_input_grad + (False,) * (5 - len(ctx.needs_input_grad))  # trailing defaults may be absent
    if needs[0]:
        grad_x = grad_input_fn(grad_2d, values, col_indices, in_features)
        grad_x = grad_x if flat else grad_x.view(x.shape)
    if needs[1]:
        grad_values = _cast(grad_values_fn(grad_2d, x_2d, col_indices, block_size), values.dtype)
    if ctx.has_bias and needs[3]:
        # One op, as nn.Linear's bias gradient: torch sums bfloat16 / float16 in float32 and rounds once.
        if grad_2d.dtype == ctx.bias_dtype:
            grad_bias = grad_2d.sum(0)
        else:
            grad_bias = grad_2d.sum(0, dtype=_at_least_float32(grad_2d.dtype)).to(ctx.bias_dtype)
    if needs[4]:
        # One fused reduction per tensor (no float32 copies of x or grad_out): norms, then squared (once,
        # for both), in the probe's dtype (at least float32): a float64 probe keeps energies beyond
        # float32's range.
        acc = _at_least_float32(ctx.probe_dtype)
        error_norm = _block_norms(grad_2d, block_rows, block_size, acc)  # [R]
        activation_norm = _block_norms(x_2d, in_features // block_size, block_size, acc)  # [C]
        grad_probe = _cast(torch.cat([error_norm, activation_norm]).square(), ctx.probe_dtype)
    return (grad_x, grad_values, None, grad_bias, grad_probe)[: len(ctx.needs_input_grad)]


def backward_through_ops(ctx, grad_y):
    """The backward as differentiable op calls: the op's backward, and the eager route's where a
    graph of the backward is being built (``create_graph=True``)."""
    ops = torch.ops.sparsify
    return backward_grads(ctx, grad_y, ops.block_ell_grad_input, ops.block_ell_grad_values)


block_ell_linear.register_autograd(backward_through_ops, setup_context=_setup_context)


def _save_grad_op_inputs(ctx, inputs, output):
    grad_out, other, col_indices, size = inputs
    ctx.save_for_backward(grad_out, other, col_indices)
    ctx.size = size


def _grad_input_backward(ctx, grad_grad_x):
    # grad_x = grad_out W: d/dgrad_out is the forward of grad_grad_x, d/dvalues is grad_values.
    grad_out, values, col_indices = ctx.saved_tensors
    ops = torch.ops.sparsify
    d_grad_out = d_values = None
    if ctx.needs_input_grad[0]:
        d_grad_out = ops.block_ell_linear(grad_grad_x.to(values.dtype), values, col_indices).to(grad_out.dtype)
    if ctx.needs_input_grad[1]:
        d_values = ops.block_ell_grad_values(grad_out, grad_grad_x, col_indices, values.shape[-1]).to(values.dtype)
    return d_grad_out, d_values, None, None


def _grad_values_backward(ctx, grad_grad_values):
    # grad_values = grad_out^T x at the kept blocks: d/dgrad_out is x through the weight
    # grad_grad_values, d/dx is grad_out through it transposed (grad_input).
    grad_out, x, col_indices = ctx.saved_tensors
    ops = torch.ops.sparsify
    upstream = grad_grad_values.to(x.dtype)
    d_grad_out = d_x = None
    if ctx.needs_input_grad[0]:
        d_grad_out = ops.block_ell_linear(x, upstream, col_indices).to(grad_out.dtype)
    if ctx.needs_input_grad[1]:
        d_x = ops.block_ell_grad_input(grad_out, upstream.to(grad_out.dtype), col_indices, x.shape[-1]).to(x.dtype)
    return d_grad_out, d_x, None, None


block_ell_grad_input.register_autograd(_grad_input_backward, setup_context=_save_grad_op_inputs)
block_ell_grad_values.register_autograd(_grad_values_backward, setup_context=_save_grad_op_inputs)


# ---------------------------------------------------------------------------------------------------
# Autocast, like nn.Linear: floating inputs cast to the autocast dtype in force on x's device; and
# the other private torch._C calls of the package, in one place (they may change between releases:
# tests/test_ops.py and tests/test_functional.py cover each of them).
#
# torch.library.register_autocast (torch 2.11 and 2.13 alike) does not fit: it fixes one cast dtype
# when the rule is registered (``cast_inputs``), where nn.Linear casts to the dtype of the
# torch.autocast region it runs in (bfloat16 or float16, chosen by the user at call time); and it
# casts every floating tensor argument, the float32 stats probe included. So the rule is registered
# by hand, through the same private torch._C calls register_autocast makes: a Python kernel for the
# Python dispatcher (compile, export) and a Library impl for the C++ one.


def _autocast_cast(t: torch.Tensor | None, device_type: str) -> torch.Tensor | None:
    dtype = torch.get_autocast_dtype(device_type)
    return t.to(dtype) if t is not None and t.is_floating_point() and t.device.type == device_type else t


AUTOCAST_DEVICES = ("cpu", "cuda")


def autocast_inputs(x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    """(x, values, bias) cast to the autocast dtype in force on x's device, like ``nn.Linear``; unchanged
    outside autocast. The op's autocast kernels and ``functional``'s eager path both use it."""
    device_type = x.device.type
    if device_type not in AUTOCAST_DEVICES or not torch.is_autocast_enabled(device_type):
        return x, values, bias
    return _autocast_cast(x, device_type), _autocast_cast(values, device_type), _autocast_cast(bias, device_type)


def _register_autocast(device_type: str) -> None:
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


def eager_apply(function: type) -> "Callable":
    """``function.apply`` for calls where ``plain_eager`` holds, without the Python of torch's
    ``Function.apply`` (a signature check, a generator: microseconds a call). With no functorch
    transform active and no ``setup_context``, that wrapper only unwraps dead functorch wrappers and
    calls the C ``_FunctionBase.apply``, which this does."""
    if function.setup_context is not torch.autograd.Function.setup_context:
        raise TypeError(f"eager_apply: {function.__name__} defines setup_context; call its apply")
    apply = super(torch.autograd.Function, function).apply
    unwrap = torch._C._functorch.unwrap_if_dead

    def call(*args):
        return apply(*[unwrap(a) if isinstance(a, torch.Tensor) else a for a in args])

    return call


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def plain_eager(tensors) -> bool:
    """True where nothing but eager PyTorch on ordinary tensors would see this call: no compiler or
    tracer, no torch-dispatch or torch-function mode, no functorch transform, no tensor subclass.
    ``functional`` takes its eager route (an autograd.Function, no dispatcher trip) only then; these
    are private torch._C predicates because no public API asks "is any mode active"."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    if torch._C._is_torch_function_mode_enabled() or torch._C._are_functorch_transforms_active():
        return False
    for t in tensors:  # a loop, not all(<generator>): this runs on every eager call
        if t is not None and t.__class__ not in _PLAIN:
            return False
    return True
