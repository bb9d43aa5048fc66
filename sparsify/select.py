"""Which linears to rewrite: the generic walk (layer ranges, stacks, components, globs, ``filter_fn``)
and ``replace_submodule``, the one function every rewrite uses to put a new module in place.

A linear's *layer index* is the index inside the first numbered container (``nn.ModuleList`` /
``nn.Sequential``) on its path from the root; the path before it is its *stack* (``model.layers``,
``encoder.block``, ``decoder.block``) and the path below it its *local name* (``mlp.up_proj``), from
which :mod:`sparsify.integrations.transformers` reads the component (``"mlp"``, ``"attn"``). What HF
models need beyond that (Conv1D, tied weights, experts) is asked of that module too; what a
``layers=`` spec means is :mod:`sparsify.layer_spec`'s.

A module registered under several paths is one target carrying all of them: selecting any path
rewrites every path to the same sparse module.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from sparsify.integrations import transformers as hf
from sparsify.integrations.transformers import is_linear, linear_weight  # noqa: F401  (callers that read a selected linear's weight import them from here)
from sparsify.layer_spec import SHOWN, LayerSpec, check_layers_exist, parse_layers, short_repr


@dataclass(frozen=True)
class Target:
    """One selected linear: where it lives and what it is."""

    fqn: str
    module: nn.Module
    layer: int | None  # the first all-digit name on the path (a ModuleList / Sequential index), or None
    component: str  # "attn", "mlp" or "other"
    local_name: str  # the path below the layer index, e.g. "mlp.up_proj"
    stack: str = ""  # the path before the layer index, e.g. "model.layers" or "decoder.block"
    paths: tuple[str, ...] = ()  # every path the module is registered under; () means (fqn,)

    @property
    def all_paths(self) -> tuple[str, ...]:
        return self.paths or (self.fqn,)


@dataclass(frozen=True)
class Skipped:
    """A module the selectors chose that stays dense, and why."""

    fqn: str
    reason: str


@dataclass(frozen=True)
class Selection:
    """What ``select`` chose: the linears to rewrite and the chosen modules that stay dense."""

    targets: list[Target]
    skipped: list[Skipped]


def split_layer(fqn: str) -> tuple[int | None, str, str]:
    """``"model.layers.3.mlp.up_proj" -> (3, "mlp.up_proj", "model.layers")``: the first all-digit name
    on the path is the layer index; what follows is the local name, what precedes it the stack."""
    parts = fqn.split(".")
    for position, part in enumerate(parts):
        if part.isdigit():
            return int(part), ".".join(parts[position + 1 :]), ".".join(parts[:position])
    return None, "", ""


def make_target(fqn: str, module: nn.Module) -> Target:
    layer, local, stack = split_layer(fqn)
    return Target(fqn, module, layer, hf.component_of(local) if local else "other", local or fqn, stack)


def all_linears(model: nn.Module, also: Callable[[nn.Module], bool] | None = None) -> list[Target]:
    """Every ``nn.Linear`` / ``Conv1D`` (and module for which ``also`` holds) at every path it is
    registered under, with its layer, stack and component."""
    return [
        make_target(fqn, module)
        for fqn, module in model.named_modules(remove_duplicate=False)
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


def _abbreviate(names: list[str]) -> str:
    return str(names) if len(names) <= 2 * SHOWN else f"{names[: 2 * SHOWN]} and {len(names) - 2 * SHOWN} more"


def _describe(candidates: list[Target]) -> str:
    def span(indices: Iterable[int]) -> str:
        ordered = sorted(set(indices))
        return f"{ordered[0]}..{ordered[-1]}" if ordered else "none"

    described = f"the model has layers {span(t.layer for t in candidates if t.layer is not None)}"
    stacks = sorted({t.stack for t in candidates if t.layer is not None})
    if len(stacks) > 1:
        per_stack = ", ".join(f"{s} {span(t.layer for t in candidates if t.stack == s)}" for s in stacks[:SHOWN])
        described += f" (stacks {per_stack}; select one with e.g. layers='{stacks[-1]}.0..1')"
    leaves = sorted({t.fqn.rsplit('.', 1)[-1] for t in candidates})
    kinds = sorted({t.component for t in candidates})
    return f"{described}, components {kinds} and linear names {_abbreviate(leaves)}"


def _no_component_error(pattern: str, everything: list[Target], experts: list[tuple[str, str]]) -> ValueError:
    """Why ``"mlp"`` / ``"attn"`` matched nothing, and what to write instead."""
    if pattern == "mlp" and experts:
        names = ", ".join(f"{fqn} ({cls})" for fqn, cls in experts[:3])
        why = (
            f"this model's MLPs are mixture-of-experts weights stored as 3-D parameters ({names}"
            f"{', ...' if len(experts) > 3 else ''}), not nn.Linear, and sparsify does not support them"
        )
    elif all(t.layer is None for t in everything):
        why = (
            f"'{pattern}' is read from the names below a layer index (model.layers.N.{pattern}...), and no linear "
            "of this model sits in a numbered nn.ModuleList / nn.Sequential"
        )
    else:
        why = f"no linear below a layer index has a name that reads as '{pattern}'"
    return ValueError(
        f"components={pattern!r} matched no linear: {why}; name the linears instead (components='fc1' or "
        f"'*.fc1') or pass filter_fn; {_describe(everything)}"
    )


def _normalize_components(components: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if components is None:
        return None
    components = (components,) if isinstance(components, str) else tuple(components)
    if not components or not all(isinstance(c, str) and c for c in components):
        raise ValueError(f"components={short_repr(components)} must be non-empty strings such as 'mlp', 'attn' or 'up_proj'")
    return components


def _one_per_module(chosen: list[Target], everything: list[Target]) -> list[Target]:
    """One target per module, carrying every path that module is registered under."""
    paths: dict[int, list[str]] = {}
    for t in everything:
        paths.setdefault(id(t.module), []).append(t.fqn)
    seen: set[int] = set()
    unique = []
    for t in chosen:
        if id(t.module) not in seen:
            seen.add(id(t.module))
            unique.append(dataclasses.replace(t, paths=tuple(paths.get(id(t.module), [t.fqn]))))
    return unique


def select_linears(
    model: nn.Module | list[Target],
    layers: LayerSpec = None,
    components: str | Sequence[str] | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    already_sparse: Callable[[nn.Module], bool] | None = None,
    experts: list[tuple[str, str]] = (),
) -> list[Target]:
    """The linears to rewrite, one per module; raises ValueError (naming what exists) when a selector
    matches nothing.

    ``model`` is a module, or the candidate list a graph pass found. Modules for which
    ``already_sparse`` holds count as present (a layer range may name them) but are never returned:
    repeated calls leave sparse layers alone. ``experts`` (mixture-of-experts modules) only explain
    an empty ``"mlp"``.
    """
    everything = model if isinstance(model, list) else all_linears(model, also=already_sparse)
    spans = parse_layers(layers)
    components = _normalize_components(components)
    if not everything:
        raise ValueError("the model has no nn.Linear (or Conv1D) to sparsify")

    chosen = everything
    if spans is not None:
        present: dict[str, set[int]] = {}
        for t in everything:
            if t.layer is not None:
                present.setdefault(t.stack, set()).add(t.layer)
        check_layers_exist(spans, short_repr(layers), present, _describe(everything))
        chosen = [t for t in chosen if any(span.covers(t.layer, t.stack) for span in spans)]
    if components is not None:
        for pattern in components:
            if any(_matches_component(t, pattern) for t in everything):
                continue
            if pattern in ("mlp", "attn"):
                raise _no_component_error(pattern, everything, list(experts))
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
            f"sparsify: layers={short_repr(layers)}, components={short_repr(components)}"
            f"{' and filter_fn' if filter_fn else ''} match no linear; {_describe(everything)}"
        )
    return _one_per_module(chosen, everything)


def _must_stay_dense(model: nn.Module, target: Target, owners: dict) -> str | None:
    tied = hf.tied_to(target.module, owners)
    if tied:
        return (
            f"its weight is tied to {', '.join(tied)}; sparsify never unties weights (untie it first, e.g. "
            "give it its own nn.Parameter and set config.tie_word_embeddings=False, to sparsify it)"
        )
    for path in target.all_paths:
        parent_name, _, leaf = path.rpartition(".")
        reason = hf.weight_reader(model.get_submodule(parent_name), leaf)
        if reason:
            return reason
    return None


def select(
    model: nn.Module,
    layers: LayerSpec = None,
    components: str | Sequence[str] | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    already_sparse: Callable[[nn.Module], bool] | None = None,
) -> Selection:
    """``select_linears`` on a module, minus what must stay dense (tied weights, linears whose parent
    reads their weight, mixture-of-experts weights), which comes back in ``skipped``. Raises
    ValueError, changing nothing, when nothing selected can be rewritten."""
    if is_linear(model):
        raise ValueError(
            f"sparsify: the model is itself a {type(model).__name__}; sparsify replaces the linears inside a "
            "model in place and cannot replace the object you hold. For one layer use "
            "BlockSparseLinear.from_linear(linear, config); or wrap it: sparsify(nn.Sequential(linear))"
        )
    if already_sparse is not None and already_sparse(model):
        return Selection([], [])
    experts = hf.moe_experts(model)
    chosen = select_linears(model, layers, components, filter_fn, already_sparse, experts)
    spans, patterns = parse_layers(layers), _normalize_components(components)
    skipped = []
    for fqn, class_name in experts:
        expert = make_target(fqn, model.get_submodule(fqn))
        in_layers = spans is None or any(span.covers(expert.layer, expert.stack) for span in spans)
        asked = any(_matches_component(expert, p) for p in patterns) if patterns else filter_fn is None
        if in_layers and asked:
            skipped.append(Skipped(fqn, f"mixture-of-experts weights ({class_name}) are 3-D parameters, not nn.Linear; left dense"))
    return keep_rewritable(model, chosen, skipped)


def keep_rewritable(
    root: nn.Module, chosen: list[Target], skipped: list[Skipped], also: Callable[[Target], str | None] | None = None
) -> Selection:
    """``chosen`` minus the targets that must stay dense (a weight tied to another module's parameter,
    a parent that reads the weight itself, or a reason ``also`` gives), which join ``skipped``.
    Raises ValueError, changing nothing, when every chosen target must stay dense."""
    owners = hf.parameter_owners(root)
    targets = []
    for target in chosen:
        reason = _must_stay_dense(root, target, owners) or (also(target) if also is not None else None)
        if reason:
            skipped.append(Skipped(target.fqn, reason))
        else:
            targets.append(target)
    if chosen and not targets:
        reasons = "; ".join(f"{s.fqn}: {s.reason}" for s in skipped[:SHOWN])
        raise ValueError(f"sparsify: every selected linear must stay dense: {reasons}")
    return Selection(targets, skipped)


_SKIPPED_ATTRIBUTE = "_sparsify_skipped"


def report_skipped(model: nn.Module, skipped: list[Skipped]) -> None:
    """Warn about what was left dense, and keep it on the model for ``skipped_layers`` /
    ``sparsity_table``: a plain attribute (not a buffer), so it survives deepcopy and never enters
    the state_dict."""
    if not skipped:
        return
    merged = {s.fqn: s for s in skipped_layers(model)}
    merged.update((s.fqn, s) for s in skipped)
    model.__dict__[_SKIPPED_ATTRIBUTE] = list(merged.values())
    listed = "; ".join(f"{s.fqn}: {s.reason}" for s in skipped[:SHOWN])
    more = f" and {len(skipped) - SHOWN} more" if len(skipped) > SHOWN else ""
    warnings.warn(f"sparsify: left dense: {listed}{more}", UserWarning, stacklevel=3)


def skipped_layers(model: nn.Module) -> list[Skipped]:
    """The modules ``sparsify`` was asked to rewrite but left dense, each with its reason."""
    return list(model.__dict__.get(_SKIPPED_ATTRIBUTE, []))


def forget_skipped(model: nn.Module) -> None:
    model.__dict__.pop(_SKIPPED_ATTRIBUTE, None)
