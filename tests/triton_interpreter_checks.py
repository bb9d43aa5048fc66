"""Checks of the Triton kernels against a float64 reference, run only by test_triton_kernels.py in a
child pytest process with TRITON_INTERPRET=1 (see that file); the ops run on the Triton backend here."""

from __future__ import annotations

import os

import pytest
import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_triton_kernels.py"

import sparsify  # noqa: E402
from sparsify.kernels import dispatch, reference  # noqa: E402
from sparsify.kernels.split_counters import split_counters  # noqa: E402

sparsify.set_kernel_options(backend="triton")
TRITON = dispatch.triton_kernels()


def forward(x, values, col, bias, **kw):
    return TRITON.forward(x, values, col, bias, poison=True, **kw)


def grad_input(g, values, col, in_features, **kw):
    return TRITON.grad_input(g, values, col, in_features, **kw)


def grad_values(g, x, col, block, **kw):
    return TRITON.grad_values(g, x, col, block, poison=True, **kw)

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
    m, rows, k, block = x.shape[0], values.shape[0], values.shape[1], values.shape[2]
    cols = x.shape[1] // block
    y = forward(x, values, col, bias, out=nan_like((m, rows * block), torch.float32))
    gx = grad_input(g, values, col, cols * block, out=nan_like((m, cols * block), torch.float32))
    gv = grad_values(g, x, col, block, out=nan_like((rows, k, block, block), torch.float32))
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
    "activation_boxes": lambda b: {"BM": 16, "KSB": max(b, 64), "X_BOXES": True},  # x as [C, M, B] first
    "activation_boxes_split": lambda b: {"BM": 16, "KSB": max(b, 64), "X_BOXES": True, "SPLIT": 2},
    "several_slots_a_step": lambda b: {"BM": 32, "KSB": min(8 * b, 128)},
    "part_of_a_block_a_step": lambda b: {"BM": 32, "KSB": 64} if b == 128 else None,
    "one_warp_decode_tile": lambda b: dict(dispatch.DECODE_SMALL_BLOCK_TILE) if b <= 32 else None,
    "masked_dense_tiles": lambda b: {"tile": {"BM": 32, "BN": 64, "BK": 64}} if b <= 64 else None,
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block, variant", applicable(FORWARD_VARIANTS))
def test_forward_matches_float64_reference(block, dtype, variant):
    config = FORWARD_VARIANTS[variant](block)
    m, rows, cols, k = 37, 3, 5, 3
    x, _, values, col, bias = operands(m, rows, cols, k, block, dtype, seed=block)
    y = forward(x, values, col, bias, config=config, out=nan_like((m, rows * block), dtype))
    ref = reference.forward(x.double(), values.double(), col, bias.double())
    assert relative_error(y, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", BLOCKS)
def test_a_split_summed_inside_the_kernel_gives_the_bits_of_the_second_launch(block, dtype):
    """kernel_options(split_reduce="fused"): the last program of each output tile sums the partials in the
    order reduce_partials does: the same bits, twice in a row (its counters are zero again after a call),
    with and without bias, 37 tokens (a partial token tile), an empty third slot range at B = 16."""
    m, rows, cols, k = 37, 3, 5, 4
    x, _, values, col, bias = operands(m, rows, cols, k, block, dtype, seed=block + 21)
    config = {"BM": 16, "KSB": max(block, 64), "SPLIT": 3}
    shape = (m, rows * block)
    for b in (bias, None):
        launched = forward(x, values, col, b, config=config, out=nan_like(shape, dtype))
        with sparsify.kernel_options(split_reduce="fused"):
            fused = [forward(x, values, col, b, config=config, out=nan_like(shape, dtype)) for _ in range(2)]
        assert torch.equal(fused[0], launched) and torch.equal(fused[1], launched)
        ref = reference.forward(x.double(), values.double(), col, None if b is None else b.double())
        assert relative_error(fused[0], ref) < TOLERANCE[dtype]
    counters = split_counters(x, 1)  # the buffer those calls counted in
    assert counters.numel() >= -(-m // 16) * rows and not counters.any()
    # the counts decide who sums: a counter left at 1 makes the second arrival of tile 0 sum while one
    # partial is still the NaN poison, and the late third arrival leaves the counter at 1
    counters[0] = 1
    with sparsify.kernel_options(split_reduce="fused"):
        stale = forward(x, values, col, bias, config=config, out=nan_like(shape, dtype))
    assert stale[:16, :block].isnan().any() and torch.isfinite(stale[16:]).all()
    assert counters[0] == 1 and not counters[1:].any()
    counters.zero_()


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
    config = GRAD_INPUT_VARIANTS[variant](block)
    m, rows, cols, k = 37, 4, 5, 2  # 8 slots over 5 columns: uneven column counts
    _, g, values, col, _ = operands(m, rows, cols, k, block, dtype, seed=block + 1)
    first = grad_input(g, values, col, cols * block, config=config, out=nan_like((m, cols * block), dtype))
    again = grad_input(g, values, col, cols * block, config=config, out=nan_like((m, cols * block), dtype))
    ref = reference.grad_input(g.double(), values.double(), col, cols * block)
    assert relative_error(first, ref) < TOLERANCE[dtype]
    assert torch.equal(first, again)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block, variant", applicable(GRAD_VALUES_VARIANTS))
def test_grad_values_matches_float64_reference_and_repeats_bitwise(block, dtype, variant):
    config = GRAD_VALUES_VARIANTS[variant](block)
    m, rows, cols, k = 45, 3, 5, 3
    x, g, values, col, _ = operands(m, rows, cols, k, block, dtype, seed=block + 2)
    shape = (rows, k, block, block)
    first = grad_values(g, x, col, block, config=config, out=nan_like(shape, dtype))
    again = grad_values(g, x, col, block, config=config, out=nan_like(shape, dtype))
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
    block, rows, cols = 16, 2, 5
    col = torch.tensor([[3], [0]], dtype=torch.int32)  # columns 1, 2, 4 unused
    _, g, values, _, _ = operands(9, rows, cols, 1, block, torch.float32, seed=7)
    gx = grad_input(g, values, col, cols * block, out=nan_like((9, cols * block), torch.float32))
    per_col = gx.view(9, cols, block)
    assert torch.isfinite(gx).all()
    assert (per_col[:, [1, 2, 4]] == 0).all()
    assert (per_col[:, [0, 3]] != 0).any()


def test_int64_topology_gives_the_same_result():
    x, g, values, col, bias = operands(17, 3, 4, 2, 32, torch.float32, seed=3)
    assert torch.equal(forward(x, values, col, bias), forward(x, values, col.long(), bias))
    assert torch.equal(grad_values(g, x, col, 32), grad_values(g, x, col.long(), 32))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", BLOCKS)
def test_op_gradients_through_the_triton_backend_match_float64(block, dtype):
    """The custom op on CPU tensors with backend="triton": y, dL/dx, dL/dvalues, dL/dbias."""
    assert dispatch.backend_for(torch.device("cpu")) == "triton"
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


@pytest.mark.parametrize("block", [16, 64])
def test_densify_finds_each_columns_slot_past_one_chunk_of_indices_and_keeps_the_last_repeat(block):
    """tiles.densify without a slot table: 150 slots a row (past one 128-index chunk), a repeated column (the
    later slot's block is W's), columns outside [0, C) (nothing), block-columns no slot has (zeros)."""
    from sparsify.kernels import tiles

    rows, cols, k = 2, 160, 150
    gen = torch.Generator().manual_seed(block)
    col = torch.stack([torch.randperm(cols, generator=gen)[:k] for _ in range(rows)]).to(torch.int32)
    col[0, 140] = col[0, 3]  # repeated: slot 140 wins over slot 3
    col[1, 7], col[1, 149] = -1, cols + 2
    values = torch.randn(rows, k, block, block, generator=gen)
    w = tiles.densify(values, col, cols, nan_like((rows * block, cols * block), torch.float32))
    ref = torch.zeros(rows, block, cols, block)
    for r in range(rows):
        for slot in range(k):  # in slot order, so a repeat's later slot overwrites the earlier one
            c = int(col[r, slot])
            if 0 <= c < cols:
                ref[r, :, c, :] = values[r, slot]
    assert torch.equal(w, ref.reshape(rows * block, cols * block))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", BLOCKS)
def test_the_dense_weight_path_matches_float64_reads_nothing_for_bad_columns_and_repeats_bitwise(block, dtype):
    """kernel_options(block_kernel="dense"): W written by tiles.densify from the blocks at their columns, the products in
    torch; a column outside [0, C) on either side adds nothing and gets a zero gradient."""
    m, rows, cols, k = 29, 3, 5, 3
    x, g, values, col, bias = operands(m, rows, cols, k, block, dtype, seed=block + 9)
    col[1, 0], col[2, 2] = cols + 4, -1
    bad = (col < 0) | (col >= cols)
    kept, valid = values.double().masked_fill(bad[:, :, None, None], 0), col.masked_fill(bad, 0)
    with sparsify.kernel_options(block_kernel="dense", check_columns=False):
        runs = [(forward(x, values, col, bias, out=nan_like((m, rows * block), dtype)),
                 grad_input(g, values, col, cols * block, out=nan_like(x.shape, dtype)),
                 grad_values(g, x, col, block, out=nan_like(values.shape, dtype))) for _ in range(2)]
    for first, second in zip(*runs):
        assert torch.equal(first, second)
    y, gx, gv = runs[0]
    xd, gd = x.double(), g.double()
    assert relative_error(y, reference.forward(xd, kept, valid, bias.double())) < TOLERANCE[dtype]
    assert relative_error(gx, reference.grad_input(gd, kept, valid, cols * block)) < TOLERANCE[dtype]
    expected = reference.grad_values(gd, xd, valid, block).masked_fill(bad[:, :, None, None], 0.0)
    assert relative_error(gv, expected) < TOLERANCE[dtype]
    assert (gv[bad] == 0).all()


def test_many_tokens_take_the_masked_dense_tiles_for_small_blocks():
    """Above TILE_MIN_TOKENS the launcher switches kernels for B <= 32; both must agree with float64."""
    block, rows, cols, k = 16, 2, 4, 2
    m = dispatch.TILE_MIN_TOKENS + 3
    assert dispatch.use_tiles(block, k / cols, m)
    x, g, values, col, bias = operands(m, rows, cols, k, block, torch.float32, seed=5)
    assert_launchers_match_float64(x, g, values, col, bias)


@pytest.mark.parametrize("block", [64, 128])
def test_tma_forward_matches_float64_reference(block):
    """The tensor-descriptor forward (CUDA takes it for B >= 128), run directly: rows past M and
    the descriptor's box shapes come from the autotune pre-hook, as on the GPU."""
    from sparsify.kernels import forward_tma

    m, rows, cols, k = 37, 3, 5, 3
    x, _, values, col, bias = operands(m, rows, cols, k, block, torch.float32, seed=13)
    y = nan_like((m, rows * block), torch.float32)
    forward_tma.forward_tma(x, values, col, bias, y)
    assert relative_error(y, reference.forward(x.double(), values.double(), col, bias.double())) < 1e-5


@pytest.mark.parametrize("block", [64, 128])
def test_persistent_tma_forward_covers_every_tile_once_and_repeats_bitwise(block):
    """PERSISTENT configs: fewer programs than tiles (the CPU counts as 4 SMs, 3 block-rows x 3 token
    tiles here), each walking every 4th tile; every output written (NaN-poisoned first), bad columns read
    nothing."""
    from sparsify.kernels import forward_tma

    m, rows, cols, k = 70, 3, 5, 3
    x, _, values, col, bias = operands(m, rows, cols, k, block, torch.float32, seed=17)
    col[2, 1] = cols + 2
    kept = values.double().clone()
    kept[2, 1] = 0
    valid = col.masked_fill((col < 0) | (col >= cols), 0)
    config = {"BM": 32, "KC": 64, "PERSISTENT": True, "num_warps": 4, "num_stages": 2}
    runs = []
    for _ in range(2):
        y = nan_like((m, rows * block), torch.float32)
        forward_tma.forward_tma(x, values, col, bias, y, config)
        runs.append(y)
    assert torch.equal(runs[0], runs[1])
    assert relative_error(runs[0], reference.forward(x.double(), kept, valid, bias.double())) < 1e-5


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


# Out-of-range columns: every kernel masks its gathered loads on 0 <= col < C, so a slot with a bad
# column reads nothing and adds nothing (checked with the device-side check off), and the check
# (on by default) fails on the device: under the interpreter at once, as a RuntimeError.
BAD_COLUMNS = {"minus_one": -1, "C": None, "far": 100000, "int64_wraps_to_zero": 2**32}
FIXED = {
    "gather": None,
    "gather_split": {"BM": 16, "KSB": 64, "SPLIT": 3},
    "tiles": {"tile": {"BM": 32, "BN": 64, "BK": 64}},
}
FIXED_GRAD_VALUES = {
    "gather": None,
    "gather_split": {"BM": 16, "GSB": 64, "SPLIT": 2},
    "tiles": {"tile": {"BO": 64, "BI": 64, "BT": 16}, "SPLIT": 2},
}


def corrupted(bad: str, block: int, seed: int):
    m, rows, cols, k = 21, 3, 4, 2
    x, g, values, col, bias = operands(m, rows, cols, k, block, torch.float32, seed=seed)
    col = col.long()
    col[1, 0] = cols if BAD_COLUMNS[bad] is None else BAD_COLUMNS[bad]
    col[2, 1] = cols + 7 if BAD_COLUMNS[bad] is None else BAD_COLUMNS[bad]
    bad_slots = (col < 0) | (col >= cols)
    kept = values.masked_fill(bad_slots[:, :, None, None], 0.0).double()
    valid = col.masked_fill(bad_slots, 0)
    # the same slots, the bad ones moved to column 0 with zero blocks: what a masked kernel computes
    return x, g, values, col if bad == "int64_wraps_to_zero" else col.int(), bias, kept, valid, bad_slots


@pytest.mark.parametrize("variant", list(FIXED))
@pytest.mark.parametrize("bad", list(BAD_COLUMNS))
def test_out_of_range_columns_read_nothing_and_add_nothing(bad, variant):
    block = 16
    x, g, values, col, bias, kept, valid, bad_slots = corrupted(bad, block, seed=31)
    cols = x.shape[1] // block
    with sparsify.kernel_options(check_columns=False):
        y = forward(x, values, col, bias, config=FIXED[variant], out=nan_like((x.shape[0], g.shape[1]), torch.float32))
        gx = grad_input(g, values, col, cols * block, config=FIXED[variant] if variant != "gather_split" else None,
                        out=nan_like(x.shape, torch.float32))
        gv = grad_values(g, x, col, block, config=FIXED_GRAD_VALUES[variant], out=nan_like(values.shape, torch.float32))
    xd, gd = x.double(), g.double()
    assert relative_error(y, reference.forward(xd, kept, valid, bias.double())) < 1e-5
    assert relative_error(gx, reference.grad_input(gd, kept, valid, cols * block)) < 1e-5
    expected_gv = reference.grad_values(gd, xd, valid, block).masked_fill(bad_slots[:, :, None, None], 0.0)
    good = ~bad_slots
    assert relative_error(gv[good], expected_gv[good]) < 1e-5
    if variant != "tiles":  # the tile kernel stores only the slots in its table: the check guards it
        assert (gv[bad_slots] == 0).all()


def test_out_of_range_columns_read_nothing_in_the_tma_forward():
    from sparsify.kernels import forward_tma

    x, g, values, col, bias, kept, valid, _ = corrupted("far", 64, seed=32)
    y = nan_like((x.shape[0], g.shape[1]), torch.float32)
    forward_tma.forward_tma(x, values, col.int().clamp(-1, 2**31 - 1), bias, y)
    assert relative_error(y, reference.forward(x.double(), kept, valid, bias.double())) < 1e-5


@pytest.mark.parametrize("variant", list(FIXED))
@pytest.mark.parametrize("bad", list(BAD_COLUMNS))
def test_the_device_check_fails_on_out_of_range_columns(bad, variant):
    x, g, values, col, bias, *_ = corrupted(bad, 16, seed=33)
    with pytest.raises(RuntimeError, match=r"outside \[0, 4\)"):
        forward(x, values, col, bias, config=FIXED[variant])
    if variant == "tiles":
        with pytest.raises(RuntimeError, match=r"outside \[0, 4\)"):
            grad_values(g, x, col, 16, config=FIXED_GRAD_VALUES[variant])
