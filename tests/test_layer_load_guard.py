"""``guard_state_dict_loads``: every sparse layer's entries are checked before load_state_dict copies anything."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsify import sparsify
from sparsify.layer import guard_state_dict_loads


def three_sparse_layers() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    return guard_state_dict_loads(sparsify(model, block_size=16, density=0.5))


def shifted_checkpoint(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every floating tensor changed, the topology kept: a load that would visibly overwrite everything."""
    return {k: (v + 1 if v.is_floating_point() else v.clone()) for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("corruption", "message"), [
    (lambda t: t.fill_(9), r"must lie in \[0, 4\)"),
    (lambda t: t.zero_(), "repeats a column"),
])
def test_rejected_load_with_one_corrupt_topology_leaves_every_tensor_unchanged(corruption, message):
    model = three_sparse_layers()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoint = shifted_checkpoint(model)
    corruption(checkpoint["4.col_indices"])  # the last layer: the first two would be copied already without the guard
    with pytest.raises(ValueError, match=message) as error:
        model.load_state_dict(checkpoint)
    assert "4" in str(error.value).split(":")[0]  # names the layer
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_rejected_load_with_a_values_shape_of_another_density_leaves_every_tensor_unchanged():
    model = three_sparse_layers()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoint = shifted_checkpoint(model)
    checkpoint["4.values"] = torch.zeros(2, 3, 16, 16)
    with pytest.raises(ValueError, match="values have shape"):
        model.load_state_dict(checkpoint)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_valid_load_goes_through_and_layers_sparsified_after_the_guard_are_checked_too():
    model = three_sparse_layers()
    checkpoint = shifted_checkpoint(model)
    model.load_state_dict(checkpoint)
    assert all(torch.equal(v, checkpoint[k]) for k, v in model.state_dict().items())
    guard_state_dict_loads(model)  # idempotent: one hook
    assert len(model._load_state_dict_pre_hooks) == 1

    wrapper = guard_state_dict_loads(nn.Sequential(nn.Linear(32, 32), model))
    sparsify(wrapper, filter_fn=lambda module, fqn: fqn == "0", block_size=16)
    bad = shifted_checkpoint(wrapper)
    bad["0.col_indices"].fill_(-1)
    before = {k: v.clone() for k, v in wrapper.state_dict().items()}
    with pytest.raises(ValueError, match="0: col_indices"):
        wrapper.load_state_dict(bad)
    assert all(torch.equal(v, before[k]) for k, v in wrapper.state_dict().items())


def test_sparsify_guards_the_model_against_partial_loads():
    model = sparsify(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)), block_size=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoint = shifted_checkpoint(model)
    checkpoint["2.col_indices"].fill_(9)
    with pytest.raises(ValueError):
        model.load_state_dict(checkpoint)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
