"""Checks of the Triton kernels against a float64 reference, run only by test_triton_kernels.py in a
child pytest process with TRITON_INTERPRET=1 and SPARSIFY_BACKEND=triton (see that file)."""

from __future__ import annotations

import os

import pytest
import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_triton_kernels.py"

BLOCKS = (16, 32, 64, 128)
DTYPES = (torch.float32, torch.bfloat16)
# float32 stays far under 1e-5 here; bf16 outputs carry bf16 rounding (~3e-3 seen)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}



def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "output holds NaN/inf: an element was not written (poisoned) or overflowed"
    return ((out.double() - ref).norm() / ref.norm()).item()


def random_topology(rows: int, cols: int, k: int, generator: torch.Generator) -> torch.Tensor:
    return torch.stack([torch.randperm(cols, generator=generator)[:k] for _ in range(rows)]).to(torch.int32)


def operands(m, rows, cols, k, block, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, cols * block, generator=gen).to(dtype)
    g = torch.randn(m, rows * block, generator=gen).to(dtype)
    values = (torch.randn(rows, k, block, block, generator=gen) / (k * block) ** 0.5).to(dtype)
    bias = torch.randn(rows * block, generator=gen).to(dtype)
    return x, g, values, random_topology(rows, cols, k, gen), bias


def nan_like(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def assert_launchers_match_float64(x, g, values, col, bias):
    """Forward, grad_input and grad_values (autotuned choice, NaN-poisoned outputs) against float64, fp32 inputs."""
    from sparsify.kernels import backward, forward, reference

    m, rows, k, block = x.shape[0], values.shape[0], values.shape[1], values.shape[2]
    cols = x.shape[1] // block
    y = forward.forward(x, values, col, bias, out=nan_like((m, rows * block), torch.float32))
    gx = backward.grad_input(g, values, col, cols * block, out=nan_like((m, cols * block), torch.float32))
    gv = backward.grad_values(g, x, col, block, out=nan_like((rows, k, block, block), torch.float32))
    xd, gd, vd = x.double(), g.double(), values.double()
    assert relative_error(y, reference.forward(xd, vd, col, bias.double())) < 1e-5
    assert relative_error(gx, reference.grad_input(gd, vd, col, cols * block)) < 1e-5
    assert relative_error(gv, reference.grad_values(gd, xd, col, block)) < 1e-5


def applicable(variants: dict) -> list[tuple[int, str]]:
    """(block size, variant) pairs where the variant exists for that block size."""
    return [(b, name) for b in BLOCKS for name, config in variants.items() if name == "auto" or config(b) is not None]


# kernel variants: None = the launcher's own choice (autotune reduced to one config here)
FORWARD_VARIANTS = {
    "auto": lambda b: None,
    "split_slots": lambda b: {"BM": 16, "KSB": max(b, 64), "SPLIT": 3},
    "several_slots_a_step": lambda b: {"BM": 32, "KSB": min(8 * b, 128)},
    "part_of_a_block_a_step": lambda b: {"BM": 32, "KSB": 64} if b == 128 else None,
    "masked_dense_tiles": lambda b: {"tile": {"BM": 32, "BN": 64, "BK": 64}} if b <= 64 else None,
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block, variant", applicable(FORWARD_VARIANTS))
def test_forward_matches_float64_reference(block, dtype, variant):
    from sparsify.kernels import forward, reference

    config = FORWARD_VARIANTS[variant](block)
    m, rows, cols, k = 37, 3, 5, 3
    x, _, values, col, bias = operands(m, rows, cols, k, block, dtype, seed=block)
    y = forward.forward(x, values, col, bias, config=config, out=nan_like((m, rows * block), dtype))
    ref = reference.forward(x.double(), values.double(), col, bias.double())
    assert relative_error(y, ref) < TOLERANCE[dtype]


GRAD_INPUT_VARIANTS = {
    "auto": lambda b: None,
    "several_entries_a_step": lambda b: {"BM": 16, "TSB": min(8 * b, 128)},
    "part_of_a_block_a_step": lambda b: {"BM": 16, "TSB": 64} if b == 128 else None,
    "masked_dense_tiles": lambda b: {"tile": {"BM": 32, "BN": 64, "BK": 64}} if b <= 64 else None,
}
GRAD_VALUES_VARIANTS = {
    "auto": lambda b: None,
    "split_tokens": lambda b: {"BM": 16, "GSB": max(b, 64), "SPLIT": 2},
    "part_of_a_block": lambda b: {"BM": 16, "GSB": 64} if b == 128 else None,
    "masked_dense_tiles": lambda b: {"tile": {"BO": 64, "BI": 64, "BT": 16}, "SPLIT": 2} if b <= 64 else None,
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block, variant", applicable(GRAD_INPUT_VARIANTS))
def test_grad_input_matches_float64_reference_and_repeats_bitwise(block, dtype, variant):
    from sparsify.kernels import backward, reference

    config = GRAD_INPUT_VARIANTS[variant](block)
    m, rows, cols, k = 37, 4, 5, 2  # 8 slots over 5 columns: uneven column counts
    _, g, values, col, _ = operands(m, rows, cols, k, block, dtype, seed=block + 1)
    first = backward.grad_input(g, values, col, cols * block, config=config, out=nan_like((m, cols * block), dtype))
    again = backward.grad_input(g, values, col, cols * block, config=config, out=nan_like((m, cols * block), dtype))
    ref = reference.grad_input(g.double(), values.double(), col, cols * block)
    assert relative_error(first, ref) < TOLERANCE[dtype]
    assert torch.equal(first, again)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block, variant", applicable(GRAD_VALUES_VARIANTS))
def test_grad_values_matches_float64_reference_and_repeats_bitwise(block, dtype, variant):
    from sparsify.kernels import backward, reference

    config = GRAD_VALUES_VARIANTS[variant](block)
    m, rows, cols, k = 45, 3, 5, 3
    x, g, values, col, _ = operands(m, rows, cols, k, block, dtype, seed=block + 2)
    shape = (rows, k, block, block)
    first = backward.grad_values(g, x, col, block, config=config, out=nan_like(shape, dtype))
    again = backward.grad_values(g, x, col, block, config=config, out=nan_like(shape, dtype))
    ref = reference.grad_values(g.double(), x.double(), col, block)
    assert relative_error(first, ref) < TOLERANCE[dtype]
    assert torch.equal(first, again)


@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("block", [16, 64])
def test_every_slot_count_from_one_to_all_columns(block, k):
    m, rows, cols = 21, 3, 6
    x, g, values, col, bias = operands(m, rows, cols, k, block, torch.float32, seed=k)
    assert_launchers_match_float64(x, g, values, col, bias)


def test_columns_no_slot_uses_get_exact_zero_input_gradient():
    from sparsify.kernels import backward

    block, rows, cols = 16, 2, 5
    col = torch.tensor([[3], [0]], dtype=torch.int32)  # columns 1, 2, 4 unused
    _, g, values, _, _ = operands(9, rows, cols, 1, block, torch.float32, seed=7)
    gx = backward.grad_input(g, values, col, cols * block, out=nan_like((9, cols * block), torch.float32))
    per_col = gx.view(9, cols, block)
    assert torch.isfinite(gx).all()
    assert (per_col[:, [1, 2, 4]] == 0).all()
    assert (per_col[:, [0, 3]] != 0).any()


def test_int64_topology_gives_the_same_result():
    from sparsify.kernels import backward, forward

    x, g, values, col, bias = operands(17, 3, 4, 2, 32, torch.float32, seed=3)
    assert torch.equal(forward.forward(x, values, col, bias), forward.forward(x, values, col.long(), bias))
    assert torch.equal(backward.grad_values(g, x, col, 32), backward.grad_values(g, x, col.long(), 32))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", BLOCKS)
def test_op_gradients_through_the_triton_backend_match_float64(block, dtype):
    """The custom op on CPU tensors with SPARSIFY_BACKEND=triton: y, dL/dx, dL/dvalues, dL/dbias."""
    import sparsify.ops  # noqa: F401
    from sparsify.kernels import reference

    assert sparsify.ops.backend_name(torch.device("cpu")) == "triton"
    m, rows, cols, k = 19, 2, 4, 2
    x, g, values, col, bias = operands(m, rows, cols, k, block, dtype, seed=11 * block)
    leaves = [t.clone().requires_grad_() for t in (x, values, bias)]
    y = torch.ops.sparsify.block_ell_linear(leaves[0], leaves[1], col, leaves[2])
    y.backward(g)
    xd, vd, bd, gd = x.double(), values.double(), bias.double(), g.double()
    assert relative_error(y.detach(), reference.forward(xd, vd, col, bd)) < TOLERANCE[dtype]
    assert relative_error(leaves[0].grad, reference.grad_input(gd, vd, col, cols * block)) < TOLERANCE[dtype]
    assert relative_error(leaves[1].grad, reference.grad_values(gd, xd, col, block)) < TOLERANCE[dtype]
    assert relative_error(leaves[2].grad, gd.sum(0)) < TOLERANCE[dtype]


def test_many_tokens_take_the_masked_dense_tiles_for_small_blocks():
    """Above TILE_MIN_TOKENS the launcher switches kernels for B <= 32; both must agree with float64."""
    from sparsify.kernels import tiles

    block, rows, cols, k = 16, 2, 4, 2
    m = tiles.TILE_MIN_TOKENS + 3
    assert tiles.use_tiles(block, k / cols, m)
    x, g, values, col, bias = operands(m, rows, cols, k, block, torch.float32, seed=5)
    assert_launchers_match_float64(x, g, values, col, bias)


@pytest.mark.parametrize("block", [64, 128])
def test_tma_forward_matches_float64_reference(block):
    """The tensor-descriptor forward (CUDA takes it for B >= 128), run directly: rows past M and
    the descriptor's box shapes come from the autotune pre-hook, as on the GPU."""
    from sparsify.kernels import forward_tma, reference

    m, rows, cols, k = 37, 3, 5, 3
    x, _, values, col, bias = operands(m, rows, cols, k, block, torch.float32, seed=13)
    y = nan_like((m, rows * block), torch.float32)
    forward_tma.forward_tma(x, values, col, bias, y)
    assert relative_error(y, reference.forward(x.double(), values.double(), col, bias.double())) < 1e-5


@pytest.mark.parametrize("rows, cols, k", [(1, 1, 1), (3, 5, 2), (7, 40, 17), (5, 300, 300), (40, 33, 1)])
def test_column_view_lists_every_columns_slots_in_order(rows, cols, k):
    from sparsify.kernels.column_view import column_view

    gen = torch.Generator().manual_seed(rows * 1000 + cols + k)
    topology = torch.rand(rows, cols, generator=gen).argsort(dim=1)[:, :k].to(torch.int32)
    slots_by_col, col_start = column_view(topology, cols)
    flat = topology.reshape(-1).long()
    expected_order = torch.sort(flat, stable=True).indices  # slots grouped by column, increasing within one
    expected_start = torch.searchsorted(flat.sort().values, torch.arange(cols + 1))
    assert torch.equal(col_start.long(), expected_start)
    assert torch.equal(slots_by_col.long(), expected_order)
