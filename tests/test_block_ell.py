import pytest
import torch

from sparsify import block_ell


def test_blocks_per_row_rounds_and_keeps_at_least_one():
    assert block_ell.blocks_per_row(8, 0.5) == 4
    assert block_ell.blocks_per_row(8, 0.01) == 1
    assert block_ell.blocks_per_row(8, 1.0) == 8
    assert block_ell.blocks_per_row(10, 0.25) == 2  # round(2.5) -> 2, Python's round-half-even


def test_gather_then_to_dense_reproduces_the_masked_weight():
    weight = torch.randn(48, 64)
    topology = block_ell.choose_topology(weight, 16, 0.5, "random", torch.Generator().manual_seed(0))
    values = block_ell.gather_blocks(weight, topology, 16)
    mask = block_ell.dense_mask(topology, 4, 16)
    assert torch.equal(block_ell.to_dense(values, topology, 64), weight * mask)
    # the layout promised in the docs: values[r, k, i, j] = W[r*B + i, col[r, k]*B + j]
    r, k = 2, 1
    c = int(topology[r, k])
    assert torch.equal(values[r, k], weight[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16])


def test_magnitude_init_keeps_largest_blocks_and_breaks_ties_by_lowest_column():
    weight = torch.zeros(16, 64)
    weight[:, 48:] = 3.0  # column 3 is largest
    weight[:, 16:32] = 1.0  # columns 1 and 2 tie
    weight[:, 32:48] = 1.0
    topology = block_ell.choose_topology(weight, 16, 0.5, "magnitude")
    assert topology.tolist() == [[1, 3]]
    assert topology.dtype == torch.int32


def test_random_init_is_seeded_and_never_repeats_a_column():
    weight = torch.randn(160, 320)
    first = block_ell.choose_topology(weight, 16, 0.3, "random", torch.Generator().manual_seed(5))
    again = block_ell.choose_topology(weight, 16, 0.3, "random", torch.Generator().manual_seed(5))
    other = block_ell.choose_topology(weight, 16, 0.3, "random", torch.Generator().manual_seed(6))
    assert torch.equal(first, again) and not torch.equal(first, other)
    block_ell.check_col_indices(first, 20, "test")  # raises on repeats


@pytest.mark.parametrize(
    "bad, message",
    [(torch.tensor([[0, 4]], dtype=torch.int32), r"\[0, 4\].*\[0, 4\)"), (torch.tensor([[1, 1]], dtype=torch.int32), "repeats")],
)
def test_check_col_indices_rejects_out_of_range_and_repeats(bad, message):
    with pytest.raises(ValueError, match=message):
        block_ell.check_col_indices(bad, 4, "layer.x")


def test_block_mask_marks_exactly_the_kept_blocks():
    topology = torch.tensor([[0, 2], [1, 3]], dtype=torch.int32)
    assert block_ell.block_mask(topology, 4).tolist() == [[True, False, True, False], [False, True, False, True]]
