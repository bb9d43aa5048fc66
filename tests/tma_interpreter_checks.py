"""Checks of the tensor-descriptor backward kernels (grad_input_tma.py, grad_values_tma.py) against a
float64 reference, run only by test_tma_kernels.py in a child pytest process with TRITON_INTERPRET=1.
Every block size they take (64, 128), float32 and bfloat16, token counts off every tile, K from 1 to C,
columns no slot uses, NaN-poisoned outputs, fixed tiles and the untimed choice, bitwise repeats."""

from __future__ import annotations

import os

import pytest
import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_tma_kernels.py"

from sparsify.kernels.grad_input_tma import tma_grad_input_fits  # noqa: E402
from sparsify.kernels.grad_values_tma import tma_grad_values_fits  # noqa: E402
from tests.gpu.test_gpu_tma_backward import run_product  # noqa: E402  (the same check, on CPU tensors)

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# (tokens, block-rows, block-columns, slots): K = 1, K = C, odd K (a grad_values program of one slot)
SHAPES = [(70, 3, 5, 2), (33, 2, 3, 3), (17, 2, 8, 1)]
GRAD_INPUT_TILES = [None, {"BM": 32, "KC": 64, "num_stages": 2}]
GRAD_VALUES_TILES = [None, {"BT": 32, "KC": 64, "GS": 2, "num_stages": 2}]


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "output holds NaN/inf: an element was not written (poisoned) or overflowed"
    return ((out.double() - ref).norm() / ref.norm()).item()


def operands(m, rows, cols, k, block, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(m, rows * block, generator=gen).to(dtype)
    x = torch.randn(m, cols * block, generator=gen).to(dtype)
    values = (torch.randn(rows, k, block, block, generator=gen) / (k * block) ** 0.5).to(dtype)
    col = torch.stack([torch.randperm(cols, generator=gen)[:k] for _ in range(rows)]).to(torch.int32)
    return g, x, values, col


@pytest.mark.parametrize("product", ["grad_input", "grad_values"])
@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tiles", range(2))
def test_tma_backward_matches_float64_and_repeats_bitwise(product, block, dtype, shape, tiles):
    config = {"grad_input": GRAD_INPUT_TILES, "grad_values": GRAD_VALUES_TILES}[product][tiles]
    m, rows, cols, k = shape
    g, x, values, col = operands(m, rows, cols, k, block, dtype, seed=m + 7 * k)
    (out, ref), (again, _) = (run_product(product, g, x, values, col, block, config) for _ in range(2))
    assert relative_error(out, ref) < TOLERANCE[dtype]
    assert torch.equal(out, again)


def test_tma_kernels_decline_blocks_narrower_than_64():
    g, x, values, _ = operands(8, 2, 4, 2, 32, torch.float32, seed=0)
    assert not tma_grad_input_fits(g, values)
    assert not tma_grad_values_fits(g, x, 32)


def test_tma_kernels_decline_misaligned_rows_and_bases():
    from sparsify.kernels.grad_input_tma import descriptors_fit

    assert descriptors_fit(torch.randn(8, 128))
    assert not descriptors_fit(torch.randn(8, 129))  # rows of 516 bytes: not a multiple of 16
    assert not descriptors_fit(torch.randn(8 * 128 + 1)[1:].view(8, 128))  # base 4 bytes off
