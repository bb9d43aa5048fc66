"""Which linears to rewrite: layer ranges, components and the naming conventions of HF models.

A linear's *layer index* is the index inside the first ``nn.ModuleList`` / ``nn.Sequential`` on its
path from the root: ``model.layers.N`` (Llama, Mistral, Qwen, Phi), ``transformer.h.N`` (GPT-2),
``model.decoder.layers.N`` (OPT), ``encoder.layer.N`` (BERT), ``gpt_neox.layers.N`` and plain
PyTorch stacks alike. Its *component* is read from the names below that index.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

LayerSpec = str | int | range | Sequence[int] | None

_ATTENTION_NAME = re.compile(r"attn|attention", re.IGNORECASE)
_MLP_NAME = re.compile(
    r"^(mlp|ffn|feed_?forward|intermediate|output|block_sparse_moe|moe|experts?|fc1|fc2|c_fc|c_proj|w1|w2|w3)$",
    re.IGNORECASE,
)
_LAYER_ITEM = re.compile(r"^\s*(\d+)\s*(?:\.\.\s*(\d+)\s*)?$")


@dataclass(frozen=True)
class Target:
    """One selected linear: where it lives and what it is."""

    fqn: str
    module: nn.Module
    layer: int | None  # the first all-digit name on the path (a ModuleList / Sequential index), or None
    component: str  # "attn", "mlp" or "other"
    local_name: str  # the path below the layer index, e.g. "mlp.up_proj"


def is_conv1d(module: nn.Module) -> bool:
    """HF GPT-2 style ``Conv1D``: a linear whose weight is stored ``[in, out]``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out, in]``, whatever the module stores."""
    return module.weight.t() if is_conv1d(module) else module.weight


def parse_layers(layers: LayerSpec) -> set[int] | None:
    """``"8..12"`` (inclusive), ``"1,3,5..7"``, an int, a range, a list of ints, or None (all)."""
    if layers is None:
        return None
    if isinstance(layers, bool):
        raise ValueError(f"layers={layers!r} is not a layer selector; use e.g. layers='8..12', 3 or range(8, 13)")
    if isinstance(layers, int):
        chosen = {layers}
    elif isinstance(layers, str):
        chosen = set()
        for item in layers.split(","):
            match = _LAYER_ITEM.match(item)
            if not match:
                raise ValueError(
                    f"layers={layers!r} is not understood; write 'A..B' (inclusive), 'A', or a comma list such as '1,3,5..7'"
                )
            first, last = int(match.group(1)), int(match.group(2) or match.group(1))
            if last < first:
                raise ValueError(f"layers={layers!r}: range {first}..{last} is empty; write the smaller index first")
            chosen.update(range(first, last + 1))
    elif isinstance(layers, (range, list, tuple, set, frozenset)):
        items = list(layers)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
            raise ValueError(f"layers={layers!r} must contain only ints")
        chosen = set(items)
    else:
        raise ValueError(f"layers={layers!r} is not a layer selector; use e.g. layers='8..12', 3 or range(8, 13)")
    negative = sorted(i for i in chosen if i < 0)
    if negative:
        raise ValueError(f"layers={layers!r} holds negative indices {negative}; layer indices start at 0")
    if not chosen:
        raise ValueError(f"layers={layers!r} selects no layer")
    return chosen


def component_of(local_name: str) -> str:
    """``"attn"`` if any name below the layer mentions attention, else ``"mlp"`` if a name is an MLP's."""
    parts = local_name.split(".")
    if any(_ATTENTION_NAME.search(part) for part in parts):
        return "attn"
    if any(_MLP_NAME.match(part) for part in parts):
        return "mlp"
    return "other"


def split_layer(fqn: str) -> tuple[int | None, str]:
    """``"model.layers.3.mlp.up_proj" -> (3, "mlp.up_proj")``: the first all-digit name on the path is
    the index inside the first ``ModuleList`` / ``Sequential``; the rest is the name within the layer."""
    parts = fqn.split(".")
    for position, part in enumerate(parts):
        if part.isdigit():
            return int(part), ".".join(parts[position + 1 :])
    return None, ""


def make_target(fqn: str, module: nn.Module) -> Target:
    layer, local = split_layer(fqn)
    return Target(fqn, module, layer, component_of(local) if local else "other", local or fqn)


def all_linears(model: nn.Module, also: Callable[[nn.Module], bool] | None = None) -> list[Target]:
    """Every ``nn.Linear`` / ``Conv1D`` (and module for which ``also`` holds) with its layer and component."""
    return [
        make_target(fqn, module)
        for fqn, module in model.named_modules()
        if fqn and (is_linear(module) or (also is not None and also(module)))
    ]


def replace_submodule(root: nn.Module, fqn: str, new: nn.Module) -> None:
    """Put ``new`` where ``root.get_submodule(fqn)`` stands: the one walk every rewrite shares."""
    parent_name, _, leaf = fqn.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)


def _matches_component(target: Target, pattern: str) -> bool:
    if pattern in ("mlp", "attn"):
        return target.component == pattern
    if not any(ch in pattern for ch in "*?[") and "." not in pattern:
        return target.fqn.rsplit(".", 1)[-1] == pattern
    return fnmatch.fnmatchcase(target.fqn, pattern) or fnmatch.fnmatchcase(target.local_name, pattern)


def _describe(candidates: list[Target]) -> str:
    layers = sorted({t.layer for t in candidates if t.layer is not None})
    span = f"{layers[0]}..{layers[-1]}" if layers else "none"
    leaves = sorted({t.fqn.rsplit('.', 1)[-1] for t in candidates})
    kinds = sorted({t.component for t in candidates})
    return f"the model has layers {span}, components {kinds} and linear names {leaves}"


def select_linears(
    model: nn.Module | list[Target],
    layers: LayerSpec = None,
    components: str | Sequence[str] | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    already_sparse: Callable[[nn.Module], bool] | None = None,
) -> list[Target]:
    """The linears to rewrite; raises ValueError (naming what exists) when a selector matches nothing.

    ``model`` is a module, or the candidate list a graph pass found.

    Modules for which ``already_sparse`` holds count as present (a layer range may name them) but
    are never returned: repeated calls leave sparse layers alone.
    """
    everything = model if isinstance(model, list) else all_linears(model, also=already_sparse)
    wanted_layers = parse_layers(layers)
    if isinstance(components, str):
        components = (components,)
    if components is not None:
        components = tuple(components)
        if not components or not all(isinstance(c, str) and c for c in components):
            raise ValueError(f"components={components!r} must be non-empty strings such as 'mlp', 'attn' or 'up_proj'")
    if not everything:
        raise ValueError("the model has no nn.Linear (or Conv1D) to sparsify")

    chosen = everything
    if wanted_layers is not None:
        present = {t.layer for t in everything if t.layer is not None}
        missing = sorted(wanted_layers - present)
        if missing:
            raise ValueError(f"layers={layers!r}: layers {missing} do not exist; {_describe(everything)}")
        chosen = [t for t in chosen if t.layer in wanted_layers]
    if components is not None:
        for pattern in components:
            if not any(_matches_component(t, pattern) for t in everything):
                raise ValueError(
                    f"components: unknown component {pattern!r}; use 'mlp', 'attn', a linear's name or a glob "
                    f"such as '*.fc1'; {_describe(everything)}"
                )
        chosen = [t for t in chosen if any(_matches_component(t, p) for p in components)]
    if filter_fn is not None:
        chosen = [t for t in chosen if filter_fn(t.module, t.fqn)]
    if already_sparse is not None and chosen and all(already_sparse(t.module) for t in chosen):
        return []  # everything selected is sparse already: nothing to do
    chosen = [t for t in chosen if already_sparse is None or not already_sparse(t.module)]
    if not chosen:
        raise ValueError(
            f"sparsify: layers={layers!r}, components={components!r}"
            f"{' and filter_fn' if filter_fn else ''} match no linear; {_describe(everything)}"
        )
    return chosen
