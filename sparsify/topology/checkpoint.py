"""TopologyOptimizer checkpoints: the ``"topology"`` entry of its state dict, validated whole before
anything is loaded.

    {"global_step": int, "last_age_step": int, "warned_nonfinite": bool, "config": dict (TopologyConfig),
     "layers": {name: {"block_ema", "probe_ema", "age", "ratio", "protected", "kept", "released",
                       "old_importance": tensors,
                       "swaps_total": int, "nonfinite": bool tensor,
                       "col_indices": [R, K] the topology the state belongs to}},
     "history": [TopologyDecision.to_dict() ...]}

The rule a load follows (:func:`validate`, then the wrapped optimizer's own load, then :func:`commit`):
  * every field is present (``nonfinite``, ``kept``, ``released``, ``old_importance`` and ``col_indices``
    may be absent: older checkpoints lack them), every tensor has this model's shape (so a state from another density or block size is
    refused) and a fitting dtype, every history record parses;
  * the topology must match: the statistics belong to the topology they were gathered on, so a state
    whose saved ``col_indices`` differ from the model's is refused. Load the model's state dict (its
    ``col_indices``) from the same checkpoint first; the optimizer never rewrites the model's topology;
  * the wrapped optimizer's per-element state of every evolved layer (Adam's moments ...) must have
    the layer's ``[R, K, ...]`` shape (:func:`check_wrapped_state`).
A rejected load raises ValueError naming the layer and the field, and changes nothing: neither the
wrapped optimizer's state nor the topology state.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields

import torch

from sparsify.topology.config import TopologyConfig
from sparsify.topology.records import TopologyDecision
from sparsify.topology.scores import LayerScores

logger = logging.getLogger("sparsify.topology")

FIELDS = ("global_step", "last_age_step", "warned_nonfinite", "config", "layers", "history")
LAYER_FIELDS = LayerScores.TENSORS + ("swaps_total",)
_KINDS = {"block_ema": "float", "probe_ema": "float", "ratio": "float", "age": "int", "protected": "bool",
          "kept": "bool", "released": "bool", "old_importance": "float"}


def topology_state(opt) -> dict:
    """The ``"topology"`` entry of ``opt.state_dict()`` (tensors and plain Python)."""
    layers = {}
    for name, s in opt.layer_scores.items():
        layers[name] = s.state_dict() | {"col_indices": opt.layers[name].col_indices.detach().clone()}
    return {
        "global_step": opt.global_step,
        "last_age_step": opt._last_age_step,
        "warned_nonfinite": opt._warned_nonfinite,
        "config": asdict(opt.config),
        "layers": layers,
        "history": [d.to_dict() for d in opt.history],
    }


@dataclass
class Prepared:
    """A validated topology state, ready to be committed (nothing in it can fail any more)."""

    global_step: int
    last_age_step: int
    warned_nonfinite: bool
    config: dict
    layers: dict[str, dict]
    history: list[TopologyDecision]


def validate(opt, topology) -> Prepared:
    """Check a topology state against ``opt`` and its model without changing either; ValueError if wrong."""
    where = "TopologyOptimizer.load_state_dict"
    if not isinstance(topology, dict):
        raise ValueError(f"{where}: the topology state must be a dict, got {type(topology).__name__}")
    missing = [name for name in FIELDS if name not in topology]
    if missing:
        raise ValueError(f"{where}: the topology state has no field {missing[0]!r} (missing: {missing}); it was not "
                         "written by TopologyOptimizer.state_dict() or is truncated")
    step, last = topology["global_step"], topology["last_age_step"]
    if not _is_int(step) or step < 0 or not _is_int(last) or not 0 <= last <= step:
        raise ValueError(f"{where}: global_step={step!r} and last_age_step={last!r} must be ints with "
                         "0 <= last_age_step <= global_step")
    for name, kind in (("config", dict), ("layers", dict), ("history", list)):
        if not isinstance(topology[name], kind):
            raise ValueError(f"{where}: the topology state's {name!r} must be a {kind.__name__}, "
                             f"got {type(topology[name]).__name__}")
    absent = sorted(set(opt.layer_scores) - set(topology["layers"]))
    if absent:
        raise ValueError(f"{where}: the checkpoint has no topology state for {absent[:5]}; it was saved from a model "
                         "sparsified differently")
    for name, s in opt.layer_scores.items():
        _check_layer(f"{where}: {name}", topology["layers"][name], s, opt.layers[name])
    history = [TopologyDecision.from_dict(d) for d in topology["history"]]
    return Prepared(int(step), int(last), bool(topology["warned_nonfinite"]), topology["config"],
                    {name: topology["layers"][name] for name in opt.layer_scores}, history)


def _check_layer(where: str, state, scores: LayerScores, layer) -> None:
    if not isinstance(state, dict):
        raise ValueError(f"{where}: the layer's topology state must be a dict, got {type(state).__name__}")
    missing = [name for name in LAYER_FIELDS if name not in state]
    if missing:
        raise ValueError(f"{where}: the layer's topology state has no field {missing[0]!r} (missing: {missing})")
    for name in LayerScores.TENSORS + tuple(n for n in LayerScores.OPTIONAL_TENSORS if n in state):
        mine, theirs = getattr(scores, name), state[name]
        if not torch.is_tensor(theirs):
            raise ValueError(f"{where}: checkpoint {name} must be a tensor, got {type(theirs).__name__}")
        if tuple(theirs.shape) != tuple(mine.shape):
            raise ValueError(
                f"{where}: checkpoint {name} has shape {tuple(theirs.shape)} but this layer needs {tuple(mine.shape)} "
                f"(K = {layer.blocks_per_row} of {layer.num_cols} block-columns, density {layer.density:.3f}); "
                "sparsify the model the same way before loading the optimizer state"
            )
        if _kind(theirs) != _KINDS[name]:
            raise ValueError(f"{where}: checkpoint {name} is {theirs.dtype}, expected a {_KINDS[name]} tensor")
    if not _is_int(state["swaps_total"]) or state["swaps_total"] < 0:
        raise ValueError(f"{where}: checkpoint swaps_total={state['swaps_total']!r} must be an int >= 0")
    flag = state.get("nonfinite", False)  # absent in older checkpoints
    if not isinstance(flag, bool) and not (torch.is_tensor(flag) and flag.numel() == 1 and flag.dtype == torch.bool):
        raise ValueError(f"{where}: checkpoint nonfinite={flag!r} must be a bool")
    saved = state.get("col_indices")  # absent in older checkpoints: nothing to compare
    if saved is not None:
        current = layer.col_indices
        if not torch.is_tensor(saved) or tuple(saved.shape) != tuple(current.shape):
            raise ValueError(f"{where}: checkpoint col_indices must be a tensor of shape {tuple(current.shape)}")
        differ = int((saved.to(current.device) != current).sum())
        if differ:
            raise ValueError(
                f"{where}: the optimizer state was saved with another topology ({differ} of {current.numel()} slots "
                "differ from the model's col_indices); its statistics describe those blocks. Load the model's "
                "state_dict from the same checkpoint first (model.load_state_dict(...), then the optimizer's)"
            )


def check_wrapped_state(opt, state_dict: dict) -> None:
    """Refuse a wrapped-optimizer state whose per-element state of an evolved layer has another ``[R, K]``
    than the layer's values (a model of another density or block size). Malformed dicts are left to the
    wrapped optimizer's own ``load_state_dict``, which refuses them before it changes anything."""
    saved_groups, saved_state = state_dict.get("param_groups"), state_dict.get("state")
    groups = opt.optimizer.param_groups
    if not isinstance(saved_groups, list) or not isinstance(saved_state, dict) or len(saved_groups) != len(groups):
        return
    names = {id(layer.values): name for name, layer in opt.layers.items()}
    for group, saved in zip(groups, saved_groups):
        indices = saved.get("params", ()) if isinstance(saved, dict) else ()
        if len(indices) != len(group["params"]):
            return
        for param, index in zip(group["params"], indices):
            entry = saved_state.get(index)
            if id(param) not in names or not isinstance(entry, dict):
                continue
            for key, value in entry.items():
                if torch.is_tensor(value) and value.dim() == param.dim() and tuple(value.shape[:2]) != tuple(param.shape[:2]):
                    raise ValueError(
                        f"TopologyOptimizer.load_state_dict: {names[id(param)]}: the wrapped optimizer's checkpoint "
                        f"state {key!r} has shape {tuple(value.shape)} but the layer's values are {tuple(param.shape)}; "
                        "the checkpoint comes from a model sparsified with another density or block size"
                    )


def commit(opt, prepared: Prepared) -> None:
    """Load a validated state into ``opt`` (cannot fail)."""
    for name, s in opt.layer_scores.items():
        s.load_state_dict(prepared.layers[name])
    for bank in opt.banks:  # the host hint is not saved: released slots may remain wherever one is marked
        bank.any_released = any(bool(s.released.any()) for s in bank.scores)
    opt.global_step = prepared.global_step
    opt._last_age_step = prepared.last_age_step
    opt._warned_nonfinite = prepared.warned_nonfinite
    opt.history = prepared.history
    saved = {f.name: prepared.config.get(f.name, f.default) for f in fields(TopologyConfig)}  # older: defaults
    if saved != asdict(opt.config):
        logger.warning("TopologyOptimizer.load_state_dict: the checkpoint was saved with %s; continuing with %s",
                       saved, opt.config)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(t: torch.Tensor) -> str:
    if t.dtype == torch.bool:
        return "bool"
    return "float" if t.is_floating_point() else "int" if not t.is_complex() else "complex"
