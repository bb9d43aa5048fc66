"""Tensor-memory (TMA) grad_values for large blocks on Hopper: dL/dvalues[r, k] = grad_out[:, r]^T
x[:, col_indices[r, k]] over all tokens, both operands loaded as bulk copies through tensor descriptors.

Program (block-row r, GS slots k0.., part j0 of the block's input side) walks the tokens BT at a time,
in order: one grad_out box [BT, B] at column r*B (shared by the GS slots) and per slot an activation
box [BT, KC] at the dynamic column col*B + j0 (rectangles, so plain Hopper TMA loads them);
acc_s [B, KC] += box_g^T box_x. One program per output element, tokens in a fixed order, no atomics:
bitwise repeatable. Tokens past M read as zeros. No token split: it is for shapes whose block-rows x
slots fill the GPU (the pointer kernel in ``grad_values.py`` splits tokens where they do not).

Where it runs: ``dispatch.use_tma`` (the block sizes where the H200 run of benchmarks/kernel_profile.py
measured it faster than the pointer kernel, on both benchmark shapes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsify.kernels.common import (
    AUTOTUNE_TIMER, cdiv, dot_precision, interpreter_upcast, m_bucket, mma, prune_descriptors,
)
from sparsify.kernels.grad_input_tma import TMA_MIN_BLOCK, descriptors_fit

# (BT tokens a step, KC input positions of a block, GS slots a program, num_warps, num_stages, WS); KC divides
# B. WS: the token loop warp-specialized, as forward_tma's (sm_90, Triton 3.6: a 12-warp program, 82 / 115 KB of
# shared memory at B = 64 / 128; untimed, benchmarks/NOTES.md sixth session; opt-in, tma="ws").
TMA_GRAD_VALUES_CONFIGS = [
    (64, 64, 1, 4, 4, False),
    (128, 64, 1, 8, 4, False),
    (64, 128, 1, 8, 3, False),
    (64, 64, 2, 8, 4, False),
    (64, 128, 2, 8, 3, False),
]
WS_TMA_GRAD_VALUES_CONFIGS = [(64, 64, 1, 4, 4, True)]  # beside the others where kernel option tma="ws" asks


def _blocks(nargs):
    nargs["g_desc"].block_shape = [nargs["BT"], nargs["B"]]
    nargs["x_desc"].block_shape = [nargs["BT"], nargs["KC"]]


_prune = prune_descriptors(  # one stage: the grad_out box [BT, B] and GS activation boxes [BT, KC]
    lambda c, block, elem: c.kwargs["BT"] * (block + c.kwargs["GS"] * c.kwargs["KC"]) * elem, lambda c: c.num_stages,
    triton.Config({"BT": 64, "KC": 64, "GS": 1, "WS": False}, num_warps=4, num_stages=2, pre_hook=_blocks))


# The signature follows the pointer kernel's of the same product argument for argument (sizes M, M_BUCKET,
# N_OUT, IN_F, K, ... by name): the autotune key, the pruners and the lean relauncher read them by those names.
@triton.jit(do_not_specialize=["M"])
def _grad_values_tma(
    g_desc,  # grad_out [M, N_OUT], block [BT, B]
    x_desc,  # x [M, IN_F], block [BT, KC]
    col_ptr,  # [R, K] int32
    dv_ptr,  # [R, K, B, B]
    M,
    M_BUCKET,
    N_OUT,
    IN_F,
    K,
    R,
    ELEM_BYTES,
    B: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BT: tl.constexpr,
    KC: tl.constexpr,
    GS: tl.constexpr,  # 1 or 2 slots a program, sharing the grad_out box
    WS: tl.constexpr,
):
    PARTS: tl.constexpr = B // KC
    pid = tl.program_id(0)
    groups = tl.cdiv(K, GS)
    r = pid // (groups * PARTS)
    k0 = (pid // PARTS) % groups * GS
    j0 = (pid % PARTS) * KC
    num_cols = IN_F // B
    col0 = tl.load(col_ptr + r * K + k0)
    col0 = tl.where((col0 >= 0) & (col0 < num_cols), col0, num_cols)  # outside [0, C): reads zeros
    col1 = tl.load(col_ptr + r * K + tl.minimum(k0 + 1, K - 1))  # the second slot (when k0 + 1 < K)
    col1 = tl.where((col1 >= 0) & (col1 < num_cols), col1, num_cols)
    acc0 = tl.zeros((B, KC), dtype=tl.float32)
    acc1 = tl.zeros((B, KC), dtype=tl.float32)
    for m0 in tl.range(0, M, BT, warp_specialize=WS):
        gt = g_desc.load([m0, r * B])  # [BT, B]
        acc0 = mma(gt.T, x_desc.load([m0, col0 * B + j0]), acc0, PRECISION, UPCAST)
        if GS > 1:
            acc1 = mma(gt.T, x_desc.load([m0, col1 * B + j0]), acc1, PRECISION, UPCAST)
    i = tl.arange(0, B)[:, None]
    j = j0 + tl.arange(0, KC)[None, :]
    base = dv_ptr + (r * K + k0).to(tl.int64) * B * B
    tl.store(base + i * B + j, acc0.to(dv_ptr.dtype.element_ty))
    if GS > 1:
        has1 = (k0 + 1 + 0 * (i + j)) < K  # [B, KC]: a program of the last, odd slot writes one block
        tl.store(base + B * B + i * B + j, acc1.to(dv_ptr.dtype.element_ty), mask=has1)


def _autotuned(table: list):
    return triton.autotune(
        configs=[triton.Config({"BT": bt, "KC": kc, "GS": gs, "WS": ws}, num_warps=w, num_stages=s, pre_hook=_blocks)
                 for bt, kc, gs, w, s, ws in table],
        key=["M_BUCKET", "N_OUT", "IN_F", "K", "B"],
        prune_configs_by={"early_config_prune": _prune},
        **AUTOTUNE_TIMER,
    )(_grad_values_tma)


_grad_values_tma_kernel = _autotuned(TMA_GRAD_VALUES_CONFIGS)
_grad_values_tma_ws_kernel = _autotuned(TMA_GRAD_VALUES_CONFIGS + WS_TMA_GRAD_VALUES_CONFIGS)


def tma_grad_values_fits(grad_out: torch.Tensor, x: torch.Tensor, block: int) -> bool:
    """Whether this kernel can run on these operands: B >= 64 and ``descriptors_fit``."""
    return block >= TMA_MIN_BLOCK and descriptors_fit(grad_out, x)


def grad_values_tma(grad_out, x, col_indices, block_size: int, *, config: dict | None = None,
                    out: torch.Tensor | None = None, ws: bool = False) -> torch.Tensor:
    """dL/dvalues [R, K, B, B] = grad_out^T x at the kept blocks, operands by tensor descriptors.
    ``config``: a fixed tile {"BT", "KC", "GS", "num_warps", "num_stages"} and optionally "WS" (default False)
    instead of autotuning (tests)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    grad_out, x = grad_out.contiguous(), x.contiguous()
    block_rows, k = col_indices.shape
    block = block_size
    num_tokens, in_features = x.shape
    out_features = grad_out.shape[1]
    col = col_indices.contiguous() if col_indices.dtype == torch.int32 else col_indices.to(torch.int32).contiguous()
    dv = out if out is not None else grad_out.new_empty(block_rows, k, block, block)
    dummy = [64, block]  # the pre-hook sets the real block shapes per config
    g_desc = TensorDescriptor(grad_out, [num_tokens, out_features], [out_features, 1], dummy)
    x_desc = TensorDescriptor(x, [num_tokens, in_features], [in_features, 1], dummy)
    args = (g_desc, x_desc, col, dv, num_tokens, m_bucket(num_tokens), out_features, in_features, k, block_rows,
            grad_out.element_size())
    flags = dict(B=block, PRECISION=dot_precision(grad_out.dtype), UPCAST=interpreter_upcast(grad_out.dtype))

    def grid(meta):
        return (block_rows * cdiv(k, meta["GS"]) * (block // meta["KC"]),)

    if config is None:  # ws: autotuned among the plain and the warp-specialized configs
        (_grad_values_tma_ws_kernel if ws else _grad_values_tma_kernel)[grid](*args, **flags)
        return dv
    g_desc.block_shape, x_desc.block_shape = [config["BT"], block], [config["BT"], config["KC"]]
    meta = {"GS": config.get("GS", 1), "KC": config["KC"]}
    _grad_values_tma_kernel.fn[grid(meta)](*args, **flags, BT=config["BT"], KC=config["KC"], GS=meta["GS"],
                                           WS=config.get("WS", False), num_warps=config.get("num_warps", 4),
                                           num_stages=config.get("num_stages", 3))
    return dv
