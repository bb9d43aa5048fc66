"""Decision records: what a Level 2 event tells the host, and the per-layer records it keeps.

    GroupRecord   one group's decision as named tensors: on the device until :func:`fetch` brings every
                  group's record (and anything else the event needs) to the host in ONE transfer
    Swaps         the swaps of one group on the host, one entry per swap (layer, block-row, slot ...)
    TopologyDecision  one layer's part of one event: what ``TopologyOptimizer.history`` holds and
                  checkpoints (plain Python), loadable from older and newer checkpoints
"""

from __future__ import annotations

import math
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields, replace

import torch


# -- the one transfer to the host -----------------------------------------------------------------
def to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """CPU copies of ``tensors`` (all on one device) in ONE device-to-host transfer (one host sync).

    The tensors are viewed as bytes and concatenated, widest dtype first so every piece stays aligned."""
    order = sorted(range(len(tensors)), key=lambda i: -tensors[i].element_size())
    flat = [tensors[i].detach().contiguous().reshape(-1).view(torch.uint8) for i in order]
    host = torch.cat(flat).cpu() if flat else torch.zeros(0, dtype=torch.uint8)
    out: list[torch.Tensor | None] = [None] * len(tensors)
    offset = 0
    for i, piece in zip(order, flat):
        t = tensors[i]
        out[i] = host[offset : offset + piece.numel()].view(t.dtype).view(t.shape)
        offset += piece.numel()
    return out


@dataclass
class GroupRecord:
    """One group's decision (L layers of one shape, ``n`` candidate pairs per block-row), as tensors.

    The pair fields are ``[L, R, n]`` in slot order within each row; only pairs with ``swap`` set
    changed anything. The last three fields are optional (the pure :func:`decide` has no ages)."""

    slots: torch.Tensor  # [L, R, n] int64
    pruned_cols: torch.Tensor  # [L, R, n] int64, the column each pair would drop
    grown_cols: torch.Tensor  # [L, R, n] int64, the column each pair would add
    pruned_scores: torch.Tensor  # [L, R, n] block score of the dropped block
    grown_scores: torch.Tensor  # [L, R, n] calibrated candidate score of the added column
    swap: torch.Tensor  # [L, R, n] bool
    explored: torch.Tensor  # [L, R, n] bool, drawn at random (epsilon) rather than by score
    taken: torch.Tensor  # [L] bool, False: the layer was skipped (non-finite statistics)
    mean_score: torch.Tensor | None = None  # [L] over the active blocks, before the decision
    age_sum: torch.Tensor | None = None  # [L] int64, sum of block ages after the decision
    column_counts: torch.Tensor | None = None  # [L, C] int64, column use after the decision

    @classmethod
    def of(cls, decision, **stats) -> "GroupRecord":
        """The record of a ``decide.Decision`` (plus the optional statistics fields)."""
        own = {f.name: getattr(decision, f.name) for f in fields(cls) if f.default is MISSING}
        return cls(**own, **stats)


def fetch(records: list[GroupRecord], extra: list[torch.Tensor]) -> tuple[list[GroupRecord], list[torch.Tensor]]:
    """Host copies of ``records`` and ``extra`` tensors: the event's one host synchronization."""
    names = [[f.name for f in fields(r) if getattr(r, f.name) is not None] for r in records]
    tensors = [getattr(r, name) for r, present in zip(records, names) for name in present] + list(extra)
    host = iter(to_host(tensors))
    out = [replace(r, **{name: next(host) for name in present}) for r, present in zip(records, names)]
    return out, list(host)


@dataclass
class Swaps:
    """The swaps of one group on the host, ordered by layer, block-row, then slot: ``[S]`` tensors."""

    layer: torch.Tensor  # int64, index of the layer within its group
    row: torch.Tensor  # int64, block-row
    slot: torch.Tensor  # int64
    pruned_col: torch.Tensor  # int64
    grown_col: torch.Tensor  # int64
    explored: torch.Tensor  # bool
    pruned_score: torch.Tensor
    grown_score: torch.Tensor

    @classmethod
    def of(cls, record: GroupRecord) -> "Swaps":
        """The swaps of a host :class:`GroupRecord`."""
        layer, row, pair = record.swap.nonzero(as_tuple=True)
        pick = lambda t: t[layer, row, pair]  # noqa: E731
        return cls(layer, row, pick(record.slots).long(), pick(record.pruned_cols).long(), pick(record.grown_cols).long(),
                   pick(record.explored), pick(record.pruned_scores), pick(record.grown_scores))

    def per_layer(self, num_layers: int) -> list[int]:
        """How many swaps each of the group's layers made."""
        return torch.bincount(self.layer, minlength=num_layers).tolist()


# -- what history keeps ---------------------------------------------------------------------------
@dataclass
class TopologyDecision:
    """One layer's part of one Level 2 event.

    ``pruned`` and ``grown`` list ``(row, slot, column)``: the block dropped from a slot and the one
    that took its place (same order, so ``pruned[i]`` and ``grown[i]`` share row and slot).
    """

    step: int
    layer: str
    num_swaps: int
    swap_rate: float  # num_swaps / (R * K)
    num_blocks: int = 0  # R * K
    pruned: list[tuple[int, int, int]] = field(default_factory=list)
    grown: list[tuple[int, int, int]] = field(default_factory=list)
    explored: int = 0  # swaps drawn at random (epsilon) rather than by score
    pruned_scores: list[float] = field(default_factory=list)  # block score of each pruned block
    grown_scores: list[float] = field(default_factory=list)  # calibrated candidate score of each grown block
    mean_block_score: float = 0.0  # over all active blocks, before the decision
    mean_age: float = 0.0  # steps, after the decision
    column_entropy: float = 0.0  # after the decision
    seconds: float = 0.0  # this layer's share of its Level 2 event's host wall time (layers are decided together)
    skipped: str | None = None  # e.g. "nonfinite": no decision was taken

    def to_dict(self) -> dict:
        """Plain Python (lists of tuples of ints and floats): safe for ``torch.load(weights_only=True)``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TopologyDecision":
        """The record :meth:`to_dict` wrote. A field this version does not know (a newer checkpoint) is
        ignored with a warning; a missing field without a default raises ValueError naming it."""
        if not isinstance(data, dict):
            raise ValueError(f"TopologyDecision.from_dict: a history record must be a dict, got {type(data).__name__}")
        known = {f.name: f for f in fields(cls)}
        missing = [name for name, f in known.items()
                   if name not in data and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            raise ValueError(
                f"TopologyDecision.from_dict: the history record {_short(data)} has no field {missing[0]!r} "
                f"(missing: {missing}); the checkpoint is truncated or was not written by TopologyOptimizer.state_dict()"
            )
        unknown = sorted(set(data) - set(known))
        if unknown:
            warnings.warn(f"TopologyDecision.from_dict: ignoring fields this version of sparsify does not know: {unknown} "
                          "(the checkpoint was written by a newer version)", UserWarning, stacklevel=2)
        out = {name: data[name] for name in known if name in data}
        for name in ("pruned", "grown"):
            if name in out:
                out[name] = [tuple(x) for x in out[name]]
        return cls(**out)


def _short(data: dict) -> str:
    text = repr({k: data[k] for k in list(data)[:3]})
    return text if len(text) < 120 else text[:117] + "..."


def layer_records(record: GroupRecord, swaps: Swaps, names: list[str], num_blocks: int, step: int) -> list[TopologyDecision]:
    """The TopologyDecision of each layer of a group, from its host record and swaps."""
    per_layer = swaps.per_layer(len(names))
    rows, slots = swaps.row.tolist(), swaps.slot.tolist()
    pruned, grown = swaps.pruned_col.tolist(), swaps.grown_col.tolist()
    explored = swaps.explored.tolist()
    pruned_scores, grown_scores = swaps.pruned_score.tolist(), swaps.grown_score.tolist()
    taken, mean_score = record.taken.tolist(), record.mean_score.tolist()
    age_sum, entropies = record.age_sum.tolist(), entropy_of_counts(record.column_counts)
    out, offset = [], 0
    for j, (name, num) in enumerate(zip(names, per_layer)):
        part = slice(offset, offset + num)
        offset += num
        out.append(TopologyDecision(
            step=step, layer=name, num_swaps=num, swap_rate=num / num_blocks, num_blocks=num_blocks,
            mean_block_score=mean_score[j] if taken[j] else math.nan, mean_age=age_sum[j] / num_blocks,
            column_entropy=entropies[j], skipped=None if taken[j] else "nonfinite",
            pruned=list(zip(rows[part], slots[part], pruned[part])), grown=list(zip(rows[part], slots[part], grown[part])),
            explored=sum(explored[part]), pruned_scores=pruned_scores[part], grown_scores=grown_scores[part],
        ))
    return out


def entropy_of_counts(counts: torch.Tensor) -> list[float]:
    """Entropy of each topology's column use ``[L, C]`` (on the host), divided by ``log(C)``: 1.0 is even."""
    num_cols = counts.shape[1]
    if num_cols <= 1:
        return [1.0] * counts.shape[0]
    counts = counts.double()
    total = counts.sum(1, keepdim=True)
    p = counts / total.clamp_min(1)
    terms = torch.where(p > 0, p * p.log(), torch.zeros_like(p))
    entropy = -terms.sum(1) / math.log(num_cols)
    return torch.where(total[:, 0] > 0, entropy, torch.ones_like(entropy)).tolist()


def column_counts(col_indices: torch.Tensor, num_cols: int) -> torch.Tensor:
    """How often each column is used by each of L topologies ``[L, R, K]``: ``[L, C]`` int64 (on their device)."""
    used = col_indices.flatten(1).long()
    counts = torch.zeros(used.shape[0], num_cols, dtype=torch.int64, device=used.device)
    return counts.scatter_add_(1, used, torch.ones_like(used))
