"""Watching the topology: metrics of decision records, column entropy, reports, snapshots and their diff, plots.

    rows = topology_report(model, optimizer)   # list of dicts; print(rows) shows a table
    before = snapshot(model); ...train...; changes = diff(before, snapshot(model))
    plot_block_mask(layer, "mask.png"); plot_swap_rate(optimizer.history, "swaps.png")

matplotlib is optional and imported only by the plot functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tabulate import tabulate
from torch import nn

from sparsify.block_ell import block_mask
from sparsify.layer import BlockSparseLinear, sparse_layers
from sparsify.topology.records import TopologyDecision, entropy_of_counts


def decision_metrics(records: list[TopologyDecision]) -> dict[str, float]:
    """Flat metrics of one Level 2 event over all layers (block-weighted swap rate, mean age and entropy)."""
    taken = [r for r in records if r.skipped is None]
    blocks = sum(r.num_blocks for r in records) or 1
    swaps = sum(r.num_swaps for r in taken)
    return {
        "topology/swaps": swaps,
        "topology/swap_rate": swaps / blocks,
        "topology/explored": sum(r.explored for r in taken),
        "topology/mean_age": sum(r.mean_age * r.num_blocks for r in records) / blocks,
        "topology/column_entropy": sum(r.column_entropy for r in records) / max(1, len(records)),
        "topology/skipped_layers": len(records) - len(taken),
        "topology/seconds": sum(r.seconds for r in records),
    }


def column_entropy(col_indices: torch.Tensor, num_cols: int) -> float:
    """Entropy of how often each block-column is used, divided by ``log(C)``: 1.0 is perfectly even."""
    if num_cols <= 1 or col_indices.numel() == 0:
        return 1.0
    return entropy_of_counts(torch.bincount(col_indices.flatten().long().cpu(), minlength=num_cols)[None])[0]


class TopologyReport(list):
    """A list of per-layer dicts that prints as a table."""

    HEADERS = ("layer", "density", "column_entropy", "mean_age", "swaps_total", "protected")

    def table(self, tablefmt: str = "github") -> str:
        if not self:
            return "no BlockSparseLinear layers"
        body = [[row.get(h) for h in self.HEADERS] for row in self]
        return tabulate(body, headers=self.HEADERS, tablefmt=tablefmt, floatfmt=".3f")

    def __str__(self) -> str:
        return self.table()


def topology_report(model: nn.Module, optimizer=None) -> TopologyReport:
    """One row per BlockSparseLinear: ``layer``, ``density``, ``column_entropy`` (in [0, 1]),
    ``mean_age`` (steps; None without an optimizer), ``swaps_total``, ``protected`` (slots).

    ``optimizer`` is the TopologyOptimizer that evolves the model (ages and swap counts live there).
    """
    scores = getattr(optimizer, "layer_scores", {}) if optimizer is not None else {}
    report = TopologyReport()
    for name, layer in _sparse_layers(model):
        s = scores.get(name)
        report.append({
            "layer": name,
            "density": layer.density,
            "column_entropy": column_entropy(layer.col_indices, layer.num_cols),
            "mean_age": float(s.age.double().mean()) if s is not None else None,
            "swaps_total": s.swaps_total if s is not None else 0,
            "protected": int(s.protected.sum()) if s is not None else 0,
        })
    return report


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """The topology of every sparse layer: ``{name: block mask [R, C] bool}`` (CPU copies)."""
    return {name: block_mask(layer.col_indices, layer.num_cols).cpu() for name, layer in _sparse_layers(model)}


@dataclass
class LayerDiff:
    """How one layer's blocks changed between two snapshots (masks are [R, C] bool)."""

    kept: torch.Tensor
    added: torch.Tensor
    removed: torch.Tensor

    @property
    def counts(self) -> dict[str, int]:
        return {"kept": int(self.kept.sum()), "added": int(self.added.sum()), "removed": int(self.removed.sum())}

    def blocks(self, which: str) -> list[tuple[int, int]]:
        """``(row, column)`` of every block in ``which`` ("kept", "added" or "removed")."""
        return [tuple(x) for x in getattr(self, which).nonzero().tolist()]


def diff(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, LayerDiff]:
    """Per layer present in both snapshots: blocks kept, added (only in ``after``), removed."""
    out = {}
    for name in before.keys() & after.keys():
        a, b = before[name], after[name]
        out[name] = LayerDiff(kept=a & b, added=b & ~a, removed=a & ~b)
    return dict(sorted(out.items()))


def swap_rates(history: list[TopologyDecision], layer: str | None = None) -> list[tuple[int, float]]:
    """``(step, swap rate)`` per Level 2 event: swaps / blocks over all layers, or of one layer."""
    totals: dict[int, list[int]] = {}
    for d in history:
        if d.skipped is None and (layer is None or d.layer == layer):
            entry = totals.setdefault(d.step, [0, 0])
            entry[0] += d.num_swaps
            entry[1] += d.num_blocks
    return [(step, swaps / max(1, blocks)) for step, (swaps, blocks) in sorted(totals.items())]


def plot_block_mask(layer: BlockSparseLinear, path: str | None = None, ax=None, title: str | None = None):
    """Draw a layer's block mask (rows x columns, dark = active); save to ``path`` if given."""
    plt = _pyplot()
    mask = block_mask(layer.col_indices, layer.num_cols).cpu().numpy()
    own = ax is None
    if own:
        height = min(10.0, max(3.0, 6 * mask.shape[0] / max(1, mask.shape[1])))
        _, ax = plt.subplots(figsize=(6, height))
    ax.imshow(mask, cmap="Greys", interpolation="nearest", aspect="auto")
    ax.set_xlabel("block-column (input)")
    ax.set_ylabel("block-row (output)")
    ax.set_title(title or f"block mask, density {layer.density:.2f}")
    return _finish(plt, ax, path, own)


def plot_swap_rate(history: list[TopologyDecision], path: str | None = None, ax=None, layer: str | None = None):
    """Draw the swap rate (percent of blocks) at each Level 2 event; save to ``path`` if given."""
    plt = _pyplot()
    own = ax is None
    if own:
        _, ax = plt.subplots(figsize=(7, 3.5))
    points = swap_rates(history, layer)
    if points:
        steps, rates = zip(*points)
        ax.plot(steps, [100 * r for r in rates], marker="o")
    ax.axhspan(1, 10, color="green", alpha=0.1, label="healthy 1-10%")
    ax.set_xlabel("step")
    ax.set_ylabel("blocks swapped (%)")
    ax.set_title(f"swap rate per decision{'' if layer is None else ' - ' + layer}")
    ax.legend(loc="upper right")
    return _finish(plt, ax, path, own)


def _finish(plt, ax, path, own):
    if path is not None:
        ax.figure.tight_layout()
        ax.figure.savefig(path, dpi=100)
        if own:
            plt.close(ax.figure)
    return ax


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from error
    return plt


def _sparse_layers(model: nn.Module) -> list[tuple[str, BlockSparseLinear]]:
    from sparsify.topology.distributed import unwrap

    return sparse_layers(unwrap(model))
