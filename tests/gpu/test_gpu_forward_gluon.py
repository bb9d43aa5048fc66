"""CUDA correctness of the Gluon forward over groups of block-rows (forward_gluon.py) against float64;
skipped without CUDA, Hopper or Triton's Gluon.

    python -m pytest tests/gpu/test_gpu_forward_gluon.py -q      # on the GPU machine

Every block size, groups of 1, 2 and 4 block-rows (a last group with fewer), bf16 and fp16, token counts
not multiple of the tile, bias on and off, a repeated column and columns outside [0, C) (nothing read,
nothing added); outputs NaN-poisoned first; each result computed twice and compared bitwise.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsify.block_ell import to_dense
from sparsify.kernels.row_groups import group_entries

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
pytestmark = pytest.mark.skipif(not HOPPER, reason="the Gluon forward needs a Hopper GPU")
CASES = [  # (B, G, tokens, block-rows, block-columns, slots, config)
    (64, 1, 1000, 4, 16, 8, {"num_warps": 4}),
    (64, 2, 77, 7, 6, 3, {}),
    (64, 4, 300, 9, 8, 4, {}),
    (64, 4, 513, 8, 12, 6, {"STAGES": 6}),
    (32, 4, 129, 5, 12, 6, {}),
    (16, 4, 64, 6, 10, 5, {"STAGES": 8}),
    (128, 2, 200, 3, 4, 2, {"STAGES": 3}),
    (64, 2, 130, 4, 8, 8, {"STAGES": 2}),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-G{c[1]}-M{c[2]}-R{c[3]}-C{c[4]}-K{c[5]}")
def test_gluon_forward_matches_float64_and_repeats_bitwise(case, with_bias, dtype):
    pytest.importorskip("triton.experimental.gluon")
    from sparsify.kernels.forward_gluon import forward_gluon

    block, group, m, rows, cols, k, config = case
    gen = torch.Generator(device="cuda").manual_seed(block + group + m)
    x = torch.randn(m, cols * block, device="cuda", generator=gen).to(dtype)
    values = (torch.randn(rows, k, block, block, device="cuda", generator=gen) / (k * block) ** 0.5).to(dtype)
    col = torch.rand(rows, cols, device="cuda", generator=gen).argsort(dim=1)[:, :k].to(torch.int32)
    col[0, -1] = col[0, 0]  # repeated: both slots add
    col[-1, 0] = cols  # outside [0, C): nothing read, nothing added
    col[1, -1] = -1
    bias = torch.randn(rows * block, device="cuda", generator=gen).to(dtype) if with_bias else None
    entries = group_entries(col, cols, group)
    outs = []
    for _ in range(2):
        y = torch.full((m, rows * block), float("nan"), device="cuda", dtype=dtype)
        forward_gluon(x, values, entries, bias, y, config)
        outs.append(y)
    bad = (col < 0) | (col >= cols)
    kept = values.double().masked_fill(bad[:, :, None, None], 0)
    ref = F.linear(x.double(), to_dense(kept, torch.where(bad, 0, col), cols * block),
                   None if bias is None else bias.double())
    assert torch.isfinite(outs[0]).all(), "an output element was not written"
    assert ((outs[0].double() - ref).norm() / ref.norm()).item() < 1.5e-2
    assert torch.equal(outs[0], outs[1])


def test_gluon_forward_refuses_entries_of_another_group_size():
    pytest.importorskip("triton.experimental.gluon")
    from sparsify.kernels.forward_gluon import forward_gluon

    x = torch.randn(128, 256, device="cuda", dtype=torch.bfloat16)
    values = torch.randn(4, 2, 64, 64, device="cuda", dtype=torch.bfloat16)
    col = torch.tensor([[0, 1], [2, 3], [1, 2], [0, 3]], device="cuda", dtype=torch.int32)
    entries = group_entries(col, 4, 2)
    wrong = tuple(t[:1] for t in entries)  # one group's entries for four block-rows
    with pytest.raises(ValueError, match="groups of 1, 2 or 4"):
        forward_gluon(x, values, wrong, None, torch.empty(128, 256, device="cuda", dtype=torch.bfloat16))
