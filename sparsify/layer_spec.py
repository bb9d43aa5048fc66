"""Layer specs: which layer indices (of which stacks) a ``layers=`` argument names.

    3, "8..12" (inclusive), "1,3,5..7", range(8, 13), [1, 3]       that index in every stack
    "decoder.2..4", "encoder.0,decoder.1", "encoder.block.0..1"   only in stacks whose path holds the name

A spec becomes a few ``LayerSpan`` s, never a list of indices: ``"0..1000000000000"`` and
``range(10**12)`` cost what ``"0..3"`` costs, and error messages show a dozen indices at most.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass

LayerSpec = str | int | range | Sequence[int] | None

_LAYER_ITEM = re.compile(r"^\s*(?:([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\.)?(\d+)\s*(?:\.\.\s*(\d+)\s*)?$")
SHOWN = 12  # indices, names or characters (x 8) an error message shows before it abbreviates


@dataclass(frozen=True)
class LayerSpan:
    """Layer indices ``first, first + step, ..., last`` (inclusive) of the stacks whose path contains
    the dotted name ``stack`` (None: every stack). Never expanded into a list."""

    first: int
    last: int
    step: int = 1
    stack: str | None = None

    def __contains__(self, index: int) -> bool:
        return self.first <= index <= self.last and (index - self.first) % self.step == 0

    def size(self) -> int:
        return (self.last - self.first) // self.step + 1

    def covers(self, layer: int | None, stack: str) -> bool:
        """Whether layer index ``layer`` of the stack at path ``stack`` is in the span."""
        in_stack = self.stack is None or names_within(self.stack, stack)
        return layer is not None and in_stack and layer in self


def names_within(name: str, path: str) -> bool:
    """Whether the dotted ``name`` is a run of whole names in ``path``: "decoder" in "model.decoder.layers"."""
    return f".{name}." in f".{path}."


def short_repr(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 8 * SHOWN else text[: 8 * SHOWN] + f"... ({len(text)} characters)"


def _format_indices(first_few: list[int], total: int) -> str:
    if total <= len(first_few):
        return str(first_few)
    return f"[{', '.join(map(str, first_few))}, ...] ({total} in all)"


def _spans_of_sorted(indices: list[int]) -> list[LayerSpan]:
    """Sorted distinct indices as runs of consecutive ones."""
    spans: list[LayerSpan] = []
    for index in indices:
        if spans and spans[-1].step == 1 and spans[-1].last == index - 1:
            spans[-1] = dataclasses.replace(spans[-1], last=index)
        else:
            spans.append(LayerSpan(index, index))
    return spans


def _merge(spans: list[LayerSpan]) -> list[LayerSpan]:
    """Overlapping or touching step-1 spans of one stack become one, so indices are counted once."""
    stepped = [s for s in spans if s.step != 1]
    merged: list[LayerSpan] = []
    for span in sorted((s for s in spans if s.step == 1), key=lambda s: (s.stack or "", s.first)):
        last = merged[-1] if merged else None
        if last is not None and last.stack == span.stack and span.first <= last.last + 1:
            merged[-1] = dataclasses.replace(last, last=max(last.last, span.last))
        else:
            merged.append(span)
    return merged + stepped


def _parse_item(item: str, shown: str) -> LayerSpan:
    match = _LAYER_ITEM.match(item)
    if not match:
        raise ValueError(
            f"layers={shown} is not understood; write 'A..B' (inclusive), 'A', a comma list such as '1,3,5..7', "
            "or name a stack: 'decoder.2..4'"
        )
    stack, first, last = match.group(1), int(match.group(2)), int(match.group(3) or match.group(2))
    if last < first:
        raise ValueError(f"layers={shown}: range {first}..{last} is empty; write the smaller index first")
    return LayerSpan(first, last, 1, stack)


def parse_layers(layers: LayerSpec) -> tuple[LayerSpan, ...] | None:
    """A layer spec as spans (see the module docstring), or None (all layers); ValueError if malformed."""
    if layers is None:
        return None
    shown = short_repr(layers)
    not_a_selector = f"layers={shown} is not a layer selector; use e.g. layers='8..12', 3, range(8, 13) or 'decoder.1..2'"
    if isinstance(layers, bool):
        raise ValueError(not_a_selector)
    if isinstance(layers, int):
        spans = [LayerSpan(layers, layers)]
    elif isinstance(layers, str):
        spans = [_parse_item(item, shown) for item in layers.split(",")]
    elif isinstance(layers, range):
        ordered = layers if layers.step > 0 else layers[::-1]
        spans = [LayerSpan(ordered[0], ordered[-1], ordered.step)] if ordered else []
    elif isinstance(layers, (list, tuple, set, frozenset)):
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise ValueError(f"layers={shown} must contain only ints")
        spans = _spans_of_sorted(sorted(set(layers)))
    else:
        raise ValueError(not_a_selector)
    if not spans:
        raise ValueError(f"layers={shown} selects no layer")
    negative = [s for s in spans if s.first < 0]
    if negative:
        first_few = [i for s in negative for i in range(s.first, min(s.last + 1, 0), s.step)[:SHOWN]][:SHOWN]
        total = sum(LayerSpan(s.first, min(s.last, -1), s.step).size() for s in negative)
        raise ValueError(f"layers={shown} holds negative indices {_format_indices(first_few, total)}; layer indices start at 0")
    return tuple(_merge(spans))


def check_layers_exist(spans: tuple[LayerSpan, ...], shown: str, present: dict[str, set[int]], describe: str) -> None:
    """Raise naming the indices (and stacks) the spans ask for that ``present`` (stack path -> layer
    indices) lacks; the work is bounded by the model's layers, however large the spans."""
    first_few, total, labels = [], 0, []
    for span in spans:
        stacks = [s for s in present if span.stack is None or names_within(span.stack, s)]
        if span.stack is not None and not stacks:
            raise ValueError(
                f"layers={shown}: no layer stack is named {span.stack!r}; the model's stacks are {sorted(present)}"
            )
        have = set().union(*(present[s] for s in stacks)) if stacks else set()
        missing = span.size() - sum(1 for i in have if i in span)
        index = span.first
        while missing and index <= span.last and len(first_few) < SHOWN:  # at most len(have) + SHOWN rounds
            if index not in have:
                first_few.append(index)
            index += span.step
        total += missing
        if missing and span.stack is not None:
            labels.append(span.stack)
    if total:
        where = f" of {', '.join(sorted(set(labels)))}" if labels else ""
        raise ValueError(
            f"layers={shown}: layers {_format_indices(first_few, total)}{where} do not exist; {describe}"
        )
