"""The Gluon decode forward with x in shared memory (sparsify/kernels/decode_gluon.py, a design under test, not
routed) on the GPU against float64 on fresh random operands: 1..16 tokens, B = 16 and 32, bf16 and fp16, a
column outside [0, C) (adds nothing), NaN-poisoned outputs, bitwise repeats; skipped without a Hopper GPU."""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from sparsify.kernels import reference  # noqa: E402

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
pytestmark = pytest.mark.skipif(not HOPPER, reason="the Gluon decode kernel needs a Hopper GPU")
TOL = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=("bf16", "fp16"))
@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("tokens, in_f, out_f", [(16, 4096, 2048), (5, 2048, 4096), (1, 1024, 640)])
def test_decode_gluon_matches_float64_and_repeats_bitwise(tokens, in_f, out_f, block, dtype):
    from sparsify.kernels.decode_gluon import decode_config, forward_decode

    gen = torch.Generator(device="cuda").manual_seed(block + tokens)
    rows, cols = out_f // block, in_f // block
    k = cols // 2
    x = torch.randn(tokens, in_f, device="cuda", dtype=dtype, generator=gen)
    values = (torch.randn(rows, k, block, block, device="cuda", generator=gen) / (k * block) ** 0.5).to(dtype)
    col = torch.rand(rows, cols, device="cuda", generator=gen).argsort(dim=1)[:, :k].to(torch.int32)
    col[3, 1] = cols + 5  # outside [0, C): nothing read, nothing added
    assert decode_config(x, values) is not None
    kept = values.double().clone()
    kept[3, 1] = 0
    ref = reference.forward(x.double(), kept, col.masked_fill(col >= cols, 0), None)
    runs = []
    for _ in range(2):
        y = torch.full((tokens, out_f), float("nan"), device="cuda", dtype=dtype)
        assert forward_decode(x, values, col, y, num_programs=torch.cuda.get_device_properties(0).multi_processor_count)
        runs.append(y)
    assert torch.isfinite(runs[0]).all()
    assert ((runs[0].double() - ref).norm() / ref.norm()).item() < TOL[dtype]
    assert torch.equal(runs[0], runs[1])
