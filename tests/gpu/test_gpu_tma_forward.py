"""CUDA correctness of the tensor-descriptor forward (forward_tma.py) with fixed tiles, one tile a program
and persistent (one program an SM over many tiles), against float64; skipped without a Hopper GPU.

    python -m pytest tests/gpu/test_gpu_tma_forward.py -q      # on the GPU machine

B = 64 and 128, bf16 and fp16, token counts that leave a partial tile, more tiles than SMs (so a persistent
program walks several), a column outside [0, C) (nothing read, nothing added); outputs NaN-poisoned first;
each result computed twice and compared bitwise.
"""

from __future__ import annotations

import pytest
import torch

from sparsify.kernels import forward_tma, reference

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
pytestmark = pytest.mark.skipif(not HOPPER, reason="tensor descriptors need a Hopper GPU")
TILES = [
    {"BM": 128, "KC": 64, "PERSISTENT": False, "num_warps": 8, "num_stages": 5},
    {"BM": 128, "KC": 64, "PERSISTENT": True, "num_warps": 8, "num_stages": 5},
    {"BM": 256, "KC": 64, "PERSISTENT": True, "num_warps": 8, "num_stages": 4},
    {"BM": 128, "KC": 64, "PERSISTENT": False, "WS": True, "num_warps": 4, "num_stages": 4},  # warp-specialized
]


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tile", TILES, ids=lambda t: f"BM{t['BM']}-{'persistent' if t['PERSISTENT'] else 'tiles'}{'-ws' if t.get('WS') else ''}")
@pytest.mark.parametrize("block, tokens, rows, cols, k", [(128, 3000, 40, 8, 4), (64, 1333, 70, 10, 5)])
def test_tma_forward_with_fixed_tiles_matches_float64_and_repeats_bitwise(block, tokens, rows, cols, k, tile, dtype):
    torch.manual_seed(block + tokens)
    x = torch.randn(tokens, cols * block, device="cuda", dtype=dtype)
    values = (torch.randn(rows, k, block, block, device="cuda") / (k * block) ** 0.5).to(dtype)
    col = torch.rand(rows, cols, device="cuda").argsort(dim=1)[:, :k].to(torch.int32)
    col[3, 1] = cols + 5  # outside [0, C)
    bias = torch.randn(rows * block, device="cuda", dtype=dtype)
    kept = values.double().clone()
    kept[3, 1] = 0
    valid = col.masked_fill((col < 0) | (col >= cols), 0)
    runs = []
    for _ in range(2):
        y = torch.full((tokens, rows * block), float("nan"), device="cuda", dtype=dtype)
        forward_tma.forward_tma(x, values, col, bias, y, tile)
        runs.append(y)
    assert torch.equal(runs[0], runs[1])
    assert rel(runs[0], reference.forward(x.double(), kept, valid, bias.double())) < 1.5e-2
