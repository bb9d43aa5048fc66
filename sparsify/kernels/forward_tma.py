"""Tensor-memory (TMA) forward for large blocks on Hopper: the same walk as the gather forward, with
the activation box [BM, KC] at the dynamic column col*B + j0 and the block part [B, KC] loaded as bulk
copies through tensor descriptors. When it runs (B >= 128, many tokens, Hopper): ``dispatch.use_tma``.
A slot whose column is outside [0, C) reads column C, past the descriptor's end: the copy fills it
with zeros, so the slot adds nothing.

Configs with PERSISTENT run one program an SM over the tiles in the same grouped order, the loop over
tiles flattened into the loop over steps, so the next tile's loads start while this one finishes: at
B = 128 a tile is only 2K steps (32 at 4096 -> 14336), so each tile's pipeline fill and drain is a large
share of it (benchmarks/NOTES.md names this design as the untried one). Tuned apart, where kernel option
tma="persistent" asks, until timed on a GPU."""

from __future__ import annotations

import triton
import triton.language as tl

from sparsify.kernels.common import AUTOTUNE_TIMER, cdiv, dot_precision, grouped_tile, m_bucket, prune_descriptors
from sparsify.kernels.dispatch import num_sms
from sparsify.kernels.launch import launch_tile

# (BM, KC, num_warps, num_stages, PERSISTENT, WS); KC divides B. The persistent ones are tuned apart, where
# kernel option tma="persistent" asks. WS: the step loop warp-specialized (tl.range(warp_specialize=True)):
# for sm_90 with Triton 3.6 a 4-warp config becomes a 12-warp program, a load warp group feeding two MMA
# warp groups (the shape of cuBLAS's 384-thread kernels), 115 / 148 KB of shared memory at B = 128; 8-warp
# configs compile unchanged. Not yet timed on a GPU (benchmarks/NOTES.md, sixth session): opt-in, tma="ws".
TMA_CONFIGS = [
    (128, 64, 4, 4, False, False),
    (128, 64, 8, 5, False, False),
    (256, 64, 8, 4, False, False),
    (128, 128, 8, 3, False, False),
]
WS_TMA_CONFIGS = [  # tuned beside TMA_CONFIGS where kernel option tma="ws" asks, until timed on a GPU
    (128, 64, 4, 3, False, True),
    (128, 64, 4, 4, False, True),
]
PERSISTENT_TMA_CONFIGS = [
    (128, 64, 8, 5, True, False),
    (256, 64, 8, 4, True, False),
    (128, 64, 4, 4, True, False),
]


def _tma_blocks(nargs):
    nargs["x_desc"].block_shape = [nargs["BM"], nargs["KC"]]
    nargs["v_desc"].block_shape = [nargs["B"], nargs["KC"]]


_prune_tma = prune_descriptors(  # one stage: the activation box [BM, KC] and the block part [B, KC]
    lambda c, block, elem: (c.kwargs["BM"] + block) * c.kwargs["KC"] * elem, lambda c: max(1, c.num_stages - 2),
    triton.Config({"BM": 64, "KC": 64, "PERSISTENT": False, "WS": False}, num_warps=4, num_stages=3, pre_hook=_tma_blocks))


@triton.jit
def _tile(tile, x_desc, v_desc, col_ptr, bias_ptr, y_ptr, M, N_OUT, IN_F, K, R, B: tl.constexpr,
          HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr, KC: tl.constexpr, WS: tl.constexpr):
    """Output tile number ``tile`` (grouped order): y[tokens, block-row r] over the row's slots."""
    pid_m, r = grouped_tile(tile, tl.cdiv(M, BM), R)  # token tile, block-row
    m0 = pid_m * BM
    acc = tl.zeros((BM, B), dtype=tl.float32)
    for p0 in tl.range(0, K * B, KC, warp_specialize=WS):
        k = p0 // B
        j0 = p0 % B
        col = tl.load(col_ptr + r * K + k)
        col = tl.where((col >= 0) & (col < IN_F // B), col, IN_F // B)  # outside [0, C): zeros
        xt = x_desc.load([m0, col * B + j0])  # [BM, KC]; tokens past M read as zeros
        w = v_desc.load([(r * K + k) * B, j0])  # [B, KC] = values[r, k, :, j0:j0+KC]
        acc = tl.dot(xt, w.T, acc, input_precision=PRECISION)
    tokens = m0 + tl.arange(0, BM)
    outs = r * B + tl.arange(0, B)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + outs).to(tl.float32)[None, :]
    out = y_ptr + tokens.to(tl.int64)[:, None] * N_OUT + outs[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=(tokens < M)[:, None])


@triton.jit(do_not_specialize=["M"])
def _forward_tma(
    x_desc,  # x [M, IN_F], block [BM, KC]
    v_desc,  # values as [R*K*B, B], block [B, KC]
    col_ptr,
    bias_ptr,
    y_ptr,
    M,  # sizes from here on: the same names in every kernel, which the autotune keys and the pruners read
    M_BUCKET,
    N_OUT,
    IN_F,
    K,
    R,
    ELEM_BYTES,
    NUM_SMS,
    B: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BM: tl.constexpr,
    KC: tl.constexpr,
    PERSISTENT: tl.constexpr,
    WS: tl.constexpr,
):
    if PERSISTENT:  # min(tiles, NUM_SMS) programs, each over every NUM_SMS-th tile
        for tile in tl.range(tl.program_id(0), tl.cdiv(M, BM) * R, NUM_SMS, flatten=True):
            _tile(tile, x_desc, v_desc, col_ptr, bias_ptr, y_ptr, M, N_OUT, IN_F, K, R, B, HAS_BIAS, PRECISION, BM, KC, WS)
    else:
        _tile(tl.program_id(0), x_desc, v_desc, col_ptr, bias_ptr, y_ptr, M, N_OUT, IN_F, K, R, B, HAS_BIAS,
              PRECISION, BM, KC, WS)


def _autotuned(table: list):
    return triton.autotune(
        configs=[
            triton.Config({"BM": bm, "KC": kc, "PERSISTENT": persistent, "WS": ws}, num_warps=w, num_stages=s,
                          pre_hook=_tma_blocks)
            for bm, kc, w, s, persistent, ws in table
        ],
        key=["M_BUCKET", "N_OUT", "IN_F", "K", "B"],
        prune_configs_by={"early_config_prune": _prune_tma},
        **AUTOTUNE_TIMER,
    )(_forward_tma)


_forward_tma_kernel = _autotuned(TMA_CONFIGS)
_forward_tma_persistent_kernel = _autotuned(PERSISTENT_TMA_CONFIGS)
_forward_tma_ws_kernel = _autotuned(TMA_CONFIGS + WS_TMA_CONFIGS)


def forward_tma(x, values, col, bias, y, config: dict | None = None, persistent: bool = False,
                ws: bool = False) -> None:
    """y [M, out] = x W^T + bias through tensor descriptors (16-byte aligned x, values and row stride);
    ``persistent``: autotuned among the persistent configs; ``ws``: among the plain and the warp-specialized. ``config``: a fixed tile {"BM", "KC",
    "PERSISTENT", "num_warps", "num_stages"} and optionally "WS" (default False) instead of autotuning."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    block_rows, k, block, _ = values.shape
    num_tokens, in_features = x.shape
    dummy = [block, 64]  # the pre-hook sets the real block shapes per config
    x_desc = TensorDescriptor(x, [num_tokens, in_features], [in_features, 1], dummy)
    v_desc = TensorDescriptor(values, [block_rows * k * block, block], [block, 1], dummy)
    sms = num_sms(x.device)

    def grid(meta):
        tiles = cdiv(num_tokens, meta["BM"]) * block_rows
        return (min(tiles, sms) if meta["PERSISTENT"] else tiles,)

    args = (x_desc, v_desc, col, bias if bias is not None else y, y,
            num_tokens, m_bucket(num_tokens), block_rows * block, in_features, k, block_rows, x.element_size(), sms)
    flags = dict(B=block, HAS_BIAS=bias is not None, PRECISION=dot_precision(x.dtype))
    if config is not None:  # the pre-hook does not run on a fixed tile: set the box shapes here
        config = {"WS": False, **config}
        _tma_blocks({"x_desc": x_desc, "v_desc": v_desc, "B": block, **config})
    kernel = _forward_tma_persistent_kernel if persistent else _forward_tma_ws_kernel if ws else _forward_tma_kernel
    launch_tile(kernel, grid, args, flags, x.device, config)
