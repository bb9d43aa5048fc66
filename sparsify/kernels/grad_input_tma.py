"""Tensor-memory (TMA) grad_input for large blocks on Hopper: grad_input's column walk (``grad_input.py``)
with both operands loaded as bulk copies through tensor descriptors.

Program (token tile, block-column c) walks c's stretch of the column view KC positions a step: entry t
is the flat slot s = r*K + k of a block in column c; its grad_out box [BM, KC] sits at the dynamic
column r*B + i0 of grad_out (a rectangle, so plain Hopper TMA loads it) and its block part
[KC, B] = values[s, i0:i0+KC, :] at row s*B + i0 of values viewed as [R*K*B, B]. Same order of
accumulation for every token tile, no atomics: bitwise repeatable. Tokens past M read as zeros.

Where it runs: ``dispatch.use_tma`` (the block sizes where the H200 run of benchmarks/kernel_profile.py
measured it faster than the pointer kernel, on both benchmark shapes).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from sparsify.kernels.common import (
    AUTOTUNE_TIMER, cdiv, dot_precision, grouped_tile, interpreter_upcast, interpreting, m_bucket, mma,
    prune_descriptors,
)

# (BM tokens, KC positions a step, num_warps, num_stages, WS); KC divides B. Stage: [BM, KC] + [KC, B].
# WS: the step loop warp-specialized, as forward_tma's (sm_90, Triton 3.6: a 4-warp config becomes a 12-warp
# program, 115-148 KB of shared memory at B = 64 / 128; untimed, benchmarks/NOTES.md sixth session; opt-in, tma="ws").
TMA_GRAD_INPUT_CONFIGS = [
    (128, 64, 4, 4, False),
    (128, 64, 8, 5, False),
    (256, 64, 8, 4, False),
    (128, 128, 8, 3, False),
    (64, 128, 4, 4, False),
]
WS_TMA_GRAD_INPUT_CONFIGS = [(128, 64, 4, 4, True)]  # beside the others where kernel option tma="ws" asks
TMA_MIN_BLOCK = 64  # narrower blocks give [BM, B] boxes too shallow for one MMA step


def _blocks(nargs):
    nargs["g_desc"].block_shape = [nargs["BM"], nargs["KC"]]
    nargs["v_desc"].block_shape = [nargs["KC"], nargs["B"]]


_prune = prune_descriptors(  # one stage: the grad_out box [BM, KC] and the block slab [KC, B]
    lambda c, block, elem: (c.kwargs["BM"] + block) * c.kwargs["KC"] * elem, lambda c: max(1, c.num_stages - 2),
    triton.Config({"BM": 64, "KC": 64, "WS": False}, num_warps=4, num_stages=3, pre_hook=_blocks))


# The signature follows the pointer kernel's of the same product argument for argument (sizes M, M_BUCKET,
# N_OUT, IN_F, K, ... by name): the autotune key, the pruners and the lean relauncher read them by those names.
@triton.jit(do_not_specialize=["M"])
def _grad_input_tma(
    g_desc,  # grad_out [M, N_OUT], block [BM, KC]
    v_desc,  # values as [R*K*B, B], block [KC, B]
    slots_ptr,  # [R*K] int32: flat slots sorted by column (the column view)
    start_ptr,  # [C + 1] int32: column c's stretch of slots_ptr
    gx_ptr,  # [M, IN_F]
    M,
    M_BUCKET,
    N_OUT,
    IN_F,
    K,
    C,
    ELEM_BYTES,
    B: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BM: tl.constexpr,
    KC: tl.constexpr,
    WS: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m, c = grouped_tile(pid, tl.cdiv(M, BM), C)  # token tile, block-column
    m0 = pid_m * BM
    lo = tl.load(start_ptr + c)
    hi = tl.load(start_ptr + c + 1)
    acc = tl.zeros((BM, B), dtype=tl.float32)
    for p0 in tl.range(lo * B, hi * B, KC, warp_specialize=WS):  # positions p = t*B + i along the column's stretch
        t = p0 // B
        i0 = p0 % B
        slot = tl.load(slots_ptr + t)
        gt = g_desc.load([m0, (slot // K) * B + i0])  # [BM, KC]: grad_out box of the slot's block-row
        vt = v_desc.load([slot * B + i0, 0])  # [KC, B] = values[slot, i0:i0+KC, :]
        acc = mma(gt, vt, acc, PRECISION, UPCAST)
    tokens = m0 + tl.arange(0, BM)
    js = tl.arange(0, B)
    out = gx_ptr + tokens.to(tl.int64)[:, None] * IN_F + (c * B + js)[None, :]
    tl.store(out, acc.to(gx_ptr.dtype.element_ty), mask=(tokens < M)[:, None])


def _autotuned(table: list):
    return triton.autotune(
        configs=[triton.Config({"BM": bm, "KC": kc, "WS": ws}, num_warps=w, num_stages=s, pre_hook=_blocks)
                 for bm, kc, w, s, ws in table],
        key=["M_BUCKET", "N_OUT", "IN_F", "K", "B"],
        prune_configs_by={"early_config_prune": _prune},
        **AUTOTUNE_TIMER,
    )(_grad_input_tma)


_grad_input_tma_kernel = _autotuned(TMA_GRAD_INPUT_CONFIGS)
_grad_input_tma_ws_kernel = _autotuned(TMA_GRAD_INPUT_CONFIGS + WS_TMA_GRAD_INPUT_CONFIGS)


@functools.cache
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def descriptors_fit(*tensors: torch.Tensor) -> bool:
    """Whether tensor descriptors can address these 2-D-viewed row-major tensors here: Hopper or newer
    (or the interpreter), 16-byte aligned bases and row strides."""
    if any(t.data_ptr() % 16 or (t.shape[-1] * t.element_size()) % 16 for t in tensors):
        return False
    device = tensors[0].device
    if device.type != "cuda":
        return interpreting()
    return _capability_major(device.index if device.index is not None else torch.cuda.current_device()) >= 9


def tma_grad_input_fits(grad_out: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether this kernel can run on these operands: B >= 64 and ``descriptors_fit``."""
    return values.shape[2] >= TMA_MIN_BLOCK and descriptors_fit(grad_out, values)


def grad_input_tma_columns(grad_out, values, slots_by_col, col_start, grad_x, config: dict | None = None,
                           ws: bool = False) -> None:
    """grad_x [M, in] = grad_out [M, out] W through the column view, operands by tensor descriptors; ``ws``:
    autotuned among the plain and the warp-specialized configs.
    ``config``: a fixed tile {"BM", "KC", "num_warps", "num_stages"} and optionally "WS" (default False)
    instead of autotuning (tests)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    block_rows, k, block, _ = values.shape
    num_tokens, out_features = grad_out.shape
    in_features = grad_x.shape[1]
    num_cols = in_features // block
    dummy = [64, block]  # the pre-hook sets the real block shapes per config
    g_desc = TensorDescriptor(grad_out, [num_tokens, out_features], [out_features, 1], dummy)
    v_desc = TensorDescriptor(values, [block_rows * k * block, block], [block, 1], dummy)
    args = (g_desc, v_desc, slots_by_col, col_start, grad_x,
            num_tokens, m_bucket(num_tokens), out_features, in_features, k, num_cols, grad_out.element_size())
    flags = dict(B=block, PRECISION=dot_precision(grad_out.dtype), UPCAST=interpreter_upcast(grad_out.dtype))
    if config is None:
        grid = lambda meta: (cdiv(num_tokens, meta["BM"]) * num_cols,)  # noqa: E731
        (_grad_input_tma_ws_kernel if ws else _grad_input_tma_kernel)[grid](*args, **flags)
        return
    g_desc.block_shape, v_desc.block_shape = [config["BM"], config["KC"]], [config["KC"], block]
    grid = (cdiv(num_tokens, config["BM"]) * num_cols,)
    _grad_input_tma_kernel.fn[grid](*args, **flags, BM=config["BM"], KC=config["KC"], WS=config.get("WS", False),
                                    num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 3))


def grad_input_tma(grad_out, values, col_indices, in_features: int, *, config: dict | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """dL/dx [M, in] = grad_out W, the column view built here (benchmarks and checks; the dispatcher
    passes its own view to ``grad_input_tma_columns``)."""
    from sparsify.kernels.column_view import column_view

    slots_by_col, col_start = column_view(col_indices, in_features // values.shape[2])
    grad_x = out if out is not None else grad_out.new_empty(grad_out.shape[0], in_features)
    grad_input_tma_columns(grad_out.contiguous(), values.contiguous(), slots_by_col, col_start, grad_x, config)
    return grad_x
