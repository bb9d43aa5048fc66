"""CUDA correctness of the grouped Gluon kernel (grouped_gluon.py: the forward over groups of block-rows,
grad_input over groups of block-columns) against float64; skipped without a Hopper GPU or Triton's Gluon.

    python -m pytest tests/gpu/test_gpu_grouped_gluon.py -q      # on the GPU machine

Every block size, groups of 1, 2 and 4 (a last group with fewer blocks), one barrier ring or two, bf16 and fp16, token counts not
multiple of the tile, bias on and off (forward), a repeated column, columns outside [0, C) (nothing read,
nothing added), a block-column no slot reads (grad_input: zeros); outputs NaN-poisoned first; each result
computed twice and compared bitwise.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsify.block_ell import to_dense
from sparsify.kernels.row_groups import forward_entries, grad_input_entries

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
pytestmark = pytest.mark.skipif(not HOPPER, reason="the Gluon kernels need a Hopper GPU")
CASES = [  # (B, G, tokens, block-rows, block-columns, slots, config)
    (64, 1, 1000, 4, 16, 8, {"num_warps": 4}),
    (64, 2, 77, 7, 6, 3, {}),
    (64, 4, 300, 9, 8, 4, {}),
    (64, 4, 513, 8, 12, 6, {"STAGES": 6}),
    (32, 4, 129, 5, 14, 6, {}),
    (16, 4, 64, 6, 10, 5, {"STAGES": 8}),
    (128, 2, 200, 3, 5, 2, {"STAGES": 3}),
    (64, 2, 130, 4, 8, 8, {"STAGES": 2}),
    # the warp-specialized kernel (a load warp of its own)
    (64, 4, 300, 9, 8, 4, {"WS": True}),
    (64, 2, 77, 7, 6, 3, {"WS": True, "STAGES": 6}),
    (32, 4, 129, 5, 14, 6, {"WS": True}),
    (64, 1, 1000, 4, 16, 8, {"WS": True, "num_warps": 4}),
    # MMAs left running after each issue (the default is 2)
    (64, 4, 300, 9, 8, 4, {"IN_FLIGHT": 1}),
    (32, 4, 129, 5, 14, 6, {"STAGES": 8, "IN_FLIGHT": 5}),
    (16, 4, 64, 6, 10, 5, {"STAGES": 8, "IN_FLIGHT": 3}),
    (64, 4, 513, 8, 12, 6, {"WS": True, "IN_FLIGHT": 3}),
    # 256-token tiles (two 64-row MMAs a warpgroup)
    (64, 2, 300, 7, 6, 3, {"BM": 256}),
    (64, 1, 1000, 4, 16, 8, {"BM": 256}),
    (64, 2, 513, 5, 8, 4, {"BM": 256, "WS": True}),
    (32, 4, 77, 9, 12, 6, {"BM": 256}),
    (16, 4, 600, 6, 10, 5, {"BM": 256, "STAGES": 8}),
    # the box on a barrier ring of its own (BOX_BARRIERS): every group size, both kernels, ring wrap-arounds
    (64, 2, 300, 7, 6, 3, {"BM": 256, "BOX_BARRIERS": True}),
    (64, 2, 77, 7, 6, 3, {"BOX_BARRIERS": True, "STAGES": 2}),
    (32, 4, 129, 5, 14, 6, {"BOX_BARRIERS": True, "STAGES": 8, "IN_FLIGHT": 3}),
    (64, 1, 1000, 4, 16, 8, {"BOX_BARRIERS": True, "num_warps": 4}),
    (128, 2, 200, 3, 5, 2, {"BOX_BARRIERS": True, "STAGES": 3}),
    (64, 2, 513, 5, 8, 4, {"BM": 256, "WS": True, "BOX_BARRIERS": True}),
    (64, 4, 300, 9, 8, 4, {"WS": True, "BOX_BARRIERS": True}),
]


def case_id(case) -> str:
    block, group, m, rows, cols, k, config = case
    return "-".join([f"B{block}-G{group}-M{m}-R{rows}-C{cols}-K{k}"] + [f"{key}{value}" for key, value in config.items()])


def operands(case, dtype):
    block, group, m, rows, cols, k, config = case
    gen = torch.Generator(device="cuda").manual_seed(block + group + m)
    x = torch.randn(m, cols * block, device="cuda", generator=gen).to(dtype)
    g = torch.randn(m, rows * block, device="cuda", generator=gen).to(dtype)
    values = (torch.randn(rows, k, block, block, device="cuda", generator=gen) / (k * block) ** 0.5).to(dtype)
    col = torch.rand(rows, cols, device="cuda", generator=gen).argsort(dim=1)[:, :k].to(torch.int32)
    col[0, -1] = col[0, 0]  # repeated: both slots add
    col[-1, 0] = cols  # outside [0, C): nothing read, nothing added
    col[1, -1] = -1
    col[col == cols - 1] = 0  # the last block-column is read by no slot
    bad = (col < 0) | (col >= cols)
    dense = to_dense(values.double().masked_fill(bad[:, :, None, None], 0), torch.where(bad, 0, col), cols * block)
    return x, g, values, col, dense


def twice(launch, shape, dtype):
    outs = []
    for _ in range(2):
        out = torch.full(shape, float("nan"), device="cuda", dtype=dtype)
        launch(out)
        outs.append(out)
    assert torch.isfinite(outs[0]).all(), "an output element was not written"
    assert torch.equal(outs[0], outs[1])
    return outs[0]


def rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_grouped_forward_matches_float64_and_repeats_bitwise(case, with_bias, dtype):
    pytest.importorskip("triton.experimental.gluon")
    from sparsify.kernels.grouped_gluon import forward_grouped

    block, group, m, rows, cols, k, config = case
    x, _, values, col, dense = operands(case, dtype)
    bias = torch.randn(rows * block, device="cuda").to(dtype) if with_bias else None
    entries = forward_entries(col, cols, group)
    y = twice(lambda out: forward_grouped(x, values, entries, bias, out, config), (m, rows * block), dtype)
    assert rel(y, F.linear(x.double(), dense, None if bias is None else bias.double())) < 1.5e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_grouped_grad_input_matches_float64_writes_zeros_for_unread_columns_and_repeats_bitwise(case, dtype):
    pytest.importorskip("triton.experimental.gluon")
    from sparsify.kernels.grouped_gluon import grad_input_grouped

    block, group, m, rows, cols, k, config = case
    _, g, values, col, dense = operands(case, dtype)
    entries = grad_input_entries(col, cols, group)
    gx = twice(lambda out: grad_input_grouped(g, values, entries, out, config), (m, cols * block), dtype)
    assert rel(gx, g.double() @ dense) < 1.5e-2
    assert (gx[:, -block:] == 0).all()


def test_entries_of_another_layer_are_refused():
    pytest.importorskip("triton.experimental.gluon")
    from sparsify.kernels.grouped_gluon import forward_grouped, grad_input_grouped

    x = torch.randn(128, 256, device="cuda", dtype=torch.bfloat16)
    values = torch.randn(4, 2, 64, 64, device="cuda", dtype=torch.bfloat16)
    col = torch.tensor([[0, 1], [2, 3], [1, 2], [0, 3]], device="cuda", dtype=torch.int32)
    out = torch.empty(128, 256, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="do not match 4 block-rows"):
        forward_grouped(x, values, forward_entries(col[:2], 4, 2), None, out)
    with pytest.raises(ValueError, match="do not match 4 block-columns"):
        grad_input_grouped(x, values, grad_input_entries(col, 8, 4), out)


@pytest.mark.parametrize("choice", ["on", "ws"])
@pytest.mark.parametrize("block", [16, 32, 64, 128])
def test_the_routed_layer_with_the_grouped_kernels_matches_float64(choice, block):
    """kernel_options(grouped=...) routes the layer's forward and grad_input through the grouped kernels,
    and their entries follow an in-place topology change (cached per state of col_indices)."""
    pytest.importorskip("triton.experimental.gluon")
    from sparsify import BlockSparseLinear, kernel_options

    torch.manual_seed(block)
    layer = BlockSparseLinear(512, 1024, block_size=block, density=0.5, bias=True, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(300, 1024, device="cuda", dtype=torch.bfloat16)
    for step in range(2):
        if step:  # a new topology, written in place as the topology optimizer does
            with torch.no_grad():
                layer.col_indices.copy_(torch.roll(layer.col_indices, shifts=1, dims=1))
        x = torch.randn(300, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        with kernel_options(grouped=choice):
            y = layer(x)
            y.backward(grad)
        dense = layer.to_dense().double()
        assert rel(y, F.linear(x.double(), dense, layer.bias.double())) < 1.5e-2
        assert rel(x.grad, grad.double() @ dense) < 1.5e-2
