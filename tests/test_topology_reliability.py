"""TopologyOptimizer under hostile inputs: statistics at the ends of the float32 range, checkpoints that
must be refused whole, records from other versions, and the topology version counter."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sparsify import BlockSparseLinear, TopologyConfig, TopologyOptimizer, sparsify
from sparsify.topology.decide import decide_layers
from tests.test_topology_optimizer import LIVELY, batch, train

DECIDE_EVERY_STEP = dict(score_every=1, update_every=1, prune_fraction=0.5, swap_threshold=1.0, epsilon=0.0)


def llama(density: float = 0.5, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=128, max_position_embeddings=64)
    return sparsify(LlamaForCausalLM(config), components="mlp", density=density, block_size=16)


def build(density: float = 0.5, config: TopologyConfig | None = None, seed: int = 0):
    model = llama(density, seed)
    opt = TopologyOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model, config or TopologyConfig(**LIVELY))
    return model, opt


def backward(model, step: int) -> None:
    ids = batch(step)
    model(input_ids=ids, labels=ids).loss.backward()


# -- statistics over the whole float32 range ---------------------------------------------------------
def test_gradients_near_1e_minus_29_still_give_nonzero_block_scores_and_a_decision():
    model, opt = build(config=TopologyConfig(**DECIDE_EVERY_STEP | dict(update_every=2)))
    backward(model, 0)
    for layer in opt.layers.values():
        layer.values.grad.mul_(1e-29)  # finite float32, but its squares are below float32's smallest number
    opt.step()  # Level 0 only
    for name, layer in opt.layers.items():
        norms = torch.linalg.vector_norm(layer.values.grad.double(), dim=(2, 3))  # [R, K], ~1e-29
        assert bool((norms > 0).any()) and float(norms.max()) < 1e-26
        # one step from zero: ema = (1 - score_ema) * norm, exactly as small as the gradient
        torch.testing.assert_close(opt.layer_scores[name].block_ema, 0.05 * norms, rtol=1e-6, atol=0)
    opt.zero_grad()
    backward(model, 1)
    for layer in opt.layers.values():
        layer.values.grad.mul_(1e-29)
    opt.step()  # the decision
    assert opt.history and all(d.skipped is None and d.mean_block_score > 0 for d in opt.history)


def test_probe_energies_beyond_float32_keep_the_statistics_finite_and_the_decision_taken():
    # activations of ~1e18 have energies (sums of squares) beyond float32: the probe is float64, so the op
    # hands them over in float64; the statistics and the candidate scores built from them stay finite
    model, opt = build(config=TopologyConfig(**DECIDE_EVERY_STEP))
    backward(model, 0)
    for layer in opt.layers.values():
        assert layer.stats_probe.grad.dtype == torch.float64
        layer.stats_probe.grad[layer.num_rows :] = 1e36 * 4096  # activation energies [C]: 1e18 over 4096 numbers
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-finite scores" warning
        opt.step()
    assert all(d.skipped is None for d in opt.history)
    for name, s in opt.layer_scores.items():
        assert bool(torch.isfinite(s.probe_ema).all()), name
        assert float(s.activation_norm.max()) == pytest.approx(0.01 * 64e18, rel=1e-9)  # (1 - candidate_ema) * norm


def test_activations_near_1e18_reach_the_statistics_without_overflowing():
    model, opt = build(config=TopologyConfig(**DECIDE_EVERY_STEP))
    layer = next(iter(opt.layers.values()))
    x = torch.full((32, layer.in_features), 1e18, requires_grad=True)
    layer(x).sum().backward()
    assert bool(torch.isfinite(layer.stats_probe.grad).all())
    assert float(layer.stats_probe.grad[layer.num_rows :].min()) == pytest.approx(32 * 16 * 1e36, rel=1e-6)


def test_decide_compares_float64_scores_below_float32s_range_in_float64():
    block = torch.tensor([[[1e-50, 4e-50]]], dtype=torch.float64)  # [L, R, K]: both underflow to 0 in float32
    candidates = torch.tensor([[[0.0, 0.0, 3e-50, 1e-49]]], dtype=torch.float64)  # [L, R, C]
    cols = torch.tensor([[[0, 1]]])
    config = TopologyConfig(prune_fraction=0.5, swap_threshold=1.5, epsilon=0.0)
    d = decide_layers(block, candidates, cols, config, seed=0)
    assert d.col_indices.tolist() == [[[3, 1]]]  # 1e-49 > 1.5 * 1e-50: the weakest block goes
    assert d.pruned_scores.dtype == torch.float64 and float(d.grown_scores[0, 0, 0]) == 1e-49


# -- a rejected load changes nothing -----------------------------------------------------------------
def snapshot(opt) -> dict:
    return copy.deepcopy(opt.state_dict())


def assert_same_state(a: dict, b: dict) -> None:
    flat_a, flat_b = _flatten(a), _flatten(b)
    assert flat_a.keys() == flat_b.keys()
    for key, value in flat_a.items():
        other = flat_b[key]
        assert (torch.equal(value, other) if torch.is_tensor(value) else value == other), key


def _flatten(obj, prefix: str = "") -> dict:
    """``{path: leaf}`` of nested dicts and lists of dicts (leaves: tensors and plain values)."""
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, list) and any(isinstance(v, dict) for v in obj):
        items = enumerate(obj)
    else:
        return {prefix: obj}
    return {k: v for key, value in items for k, v in _flatten(value, f"{prefix}/{key}").items()}


def trained_at_two_densities(steps: int):
    """``(model, opt)`` at density 0.5 and the optimizer of a model at 0.25, both trained ``steps`` steps."""
    other_model, other = build(density=0.25)
    train(other_model, other, range(steps))
    model, opt = build()
    train(model, opt, range(steps))
    return model, opt, other


def test_a_state_from_another_density_is_refused_and_leaves_both_states_as_they_were():
    model, opt, other = trained_at_two_densities(4)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.\w+_proj: checkpoint block_ema has shape .*density 0\.500"):
        opt.load_state_dict(other.state_dict())
    assert_same_state(before, snapshot(opt))
    train(model, opt, range(4, 7))  # and it still trains
    assert opt.global_step == 7


def test_a_wrapped_state_from_another_density_is_refused_even_without_a_topology_entry():
    _, opt, other = trained_at_two_densities(2)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"wrapped optimizer's checkpoint state 'exp_avg' has shape \(8, 1, 16, 16\)"):
        opt.load_state_dict(other.optimizer.state_dict())
    assert_same_state(before, snapshot(opt))


def test_a_state_from_another_topology_is_refused_until_the_model_is_loaded_from_the_same_checkpoint():
    saved_model, saved = build()
    train(saved_model, saved, range(6))
    checkpoint = {"model": copy.deepcopy(saved_model.state_dict()), "optimizer": copy.deepcopy(saved.state_dict())}
    model, opt = build()  # same shapes, the initial topology: six steps of decisions behind
    assert any(not torch.equal(a.col_indices, b.col_indices) for a, b in zip(opt.layers.values(), saved.layers.values()))
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"saved with another topology \(\d+ of \d+ slots differ"):
        opt.load_state_dict(checkpoint["optimizer"])
    assert_same_state(before, snapshot(opt))
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["optimizer"])
    assert opt.global_step == 6


@pytest.mark.parametrize("path, field", [
    (("last_age_step",), "last_age_step"),
    (("layers", "*", "age"), "age"),
    (("layers", "*", "swaps_total"), "swaps_total"),
    (("history", 0, "step"), "step"),
])
def test_a_topology_state_missing_a_field_raises_a_value_error_naming_it_and_changes_nothing(path, field):
    model, opt = build()
    train(model, opt, range(3))
    state = copy.deepcopy(opt.state_dict())
    node = state["topology"]
    for key in path[:-1]:
        node = node[next(iter(node))] if key == "*" else node[key]
    del node[path[-1]]
    before = snapshot(opt)
    with pytest.raises(ValueError, match=f"no field '{field}'"):
        opt.load_state_dict(state)
    assert_same_state(before, snapshot(opt))


def test_a_history_record_from_a_newer_version_loads_without_its_unknown_field_and_warns():
    model, opt = build()
    train(model, opt, range(3))
    state = copy.deepcopy(opt.state_dict())
    state["topology"]["history"][0]["written_by_a_newer_version"] = 1.0
    with pytest.warns(UserWarning, match="written_by_a_newer_version"):
        opt.load_state_dict(state)
    assert opt.history[0].to_dict() == {k: v for k, v in state["topology"]["history"][0].items()
                                        if k != "written_by_a_newer_version"}


def test_an_older_checkpoint_with_float32_statistics_and_no_topology_or_nonfinite_fields_loads():
    model, opt = build()
    train(model, opt, range(4))
    state = copy.deepcopy(opt.state_dict())
    for layer_state in state["topology"]["layers"].values():
        del layer_state["col_indices"], layer_state["nonfinite"]
        for name in ("block_ema", "probe_ema", "ratio"):
            layer_state[name] = layer_state[name].float()
    model_b, opt_b = build()
    model_b.load_state_dict(model.state_dict())
    opt_b.load_state_dict(state)
    for name, s in opt_b.layer_scores.items():
        assert torch.equal(s.block_ema, opt.layer_scores[name].block_ema.float().double())
    train(model_b, opt_b, range(4, 7))


# -- the topology version ----------------------------------------------------------------------------
def test_every_decision_that_changes_a_layers_topology_bumps_its_topology_version_and_no_other_does():
    model, opt = build(config=TopologyConfig(score_every=1, update_every=2, prune_fraction=0.5, swap_threshold=1.0,
                                             epsilon=0.3))
    changes = {name: 0 for name in opt.layers}
    for step in range(10):
        before = {name: (m.col_indices.clone(), getattr(m, "topology_version", 0)) for name, m in opt.layers.items()}
        train(model, opt, range(step, step + 1))
        for name, m in opt.layers.items():
            cols, version = before[name]
            changed = not torch.equal(cols, m.col_indices)
            assert getattr(m, "topology_version", 0) == version + int(changed), (step, name)
            changes[name] += int(changed)
    assert all(changes.values())


def test_loading_col_indices_into_a_layer_bumps_its_topology_version():
    layer = BlockSparseLinear(64, 32, block_size=16)
    state = layer.state_dict()
    state["col_indices"] = state["col_indices"].flip(1)
    version = layer.topology_version
    layer.load_state_dict(state)
    assert layer.topology_version > version
