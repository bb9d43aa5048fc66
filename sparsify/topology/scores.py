"""Per-block statistics for topology decisions: what each layer remembers between decisions.

For a layer with R block-rows, K slots and C block-columns, :class:`LayerScores` holds

    block_ema:  [R, K] float64  EMA of ||dL/dvalues[r, k]||_F (scorer="gradient"), updated every step (Level 0)
    probe_ema:  [R + C] float64 EMA of sqrt(probe energy): error_norm [R] then activation_norm [C]
    age:        [R, K] int64    steps since each block was grown (or since training started)
    ratio:      [] float64      calibration of candidate scores against block scores (Level 1)
    protected:  [R, K] bool     slots that are neither pruned nor trained (see TopologyOptimizer.protect)
    kept:       [R, K] bool     slots consolidated for an earlier task: never pruned, trained at a scaled
                                learning rate (see TopologyOptimizer.consolidate)
    released:   [R, K] bool     slots consolidate() gave to the next task: pruned first, until swapped
    old_importance: [R, C] float64  each position's importance for the last consolidated task over the layer's mean

Statistics are float64 and gradient norms are accumulated in float64 (so is the stats probe, a
float64 leaf: the op computes its energies in the probe's precision), so they stay meaningful over
the whole range of float32 / bfloat16 / float16 training: a gradient of 1e-29 still has a non-zero
score, activations of 1e18 still have finite energies, and their products (candidate scores) neither
underflow nor overflow. It costs no extra pass over the gradient (the norm reads it once, whatever
its accumulator) and the buffers are small (R * K + R + C numbers per layer).

These are views into the flat buffers of a :class:`ScoreBank`, which holds every layer of one device,
ordered by shape. So a step is a handful of kernels for all layers together (one block-norm kernel
per layer, then a few over the flat buffers, no host synchronization), and a decision reads the
layers of one shape as ``[L, R, K]`` stacks without copying them.

All EMAs follow ``ema = a * ema + (1 - a) * new``. A non-finite new value leaves its EMA entry as it
was and marks the layer; the next Level 2 decision skips marked layers (see ``ScoreBank.synchronize``).

Candidate scores: a would-be block (r, c) has gradient ``G_r^T X_c`` whose norm is at most
``||G_r|| * ||X_c|| = error_norm[r] * activation_norm[c]``. That bound always beats real blocks, so
it is scaled by ``ratio``, fitted on the active blocks where both the real score and the bound are
known: ``ratio = sum(block_score) / sum(error_norm[r] * activation_norm[col])`` over active blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsify.layer import BlockSparseLinear
from sparsify.topology import fsdp
from sparsify.topology.distributed import reduce_

STATS_DTYPE = torch.float64


class LayerScores:
    """The statistics of one BlockSparseLinear: views into its :class:`ScoreBank` (on the layer's device)."""

    TENSORS = ("block_ema", "probe_ema", "age", "ratio", "protected")
    OPTIONAL_TENSORS = ("kept", "released", "old_importance")  # absent in checkpoints from before consolidate(): 0

    def __init__(self, bank: "ScoreBank", index: int, layer: BlockSparseLinear) -> None:
        rows, k, cols = layer.num_rows, layer.blocks_per_row, layer.num_cols
        self.num_rows, self.num_cols = rows, cols
        blocks, probes = bank.block_range[index], bank.probe_range[index]
        self.block_ema = bank.stats[slice(*blocks)].view(rows, k)  # [R, K]
        self.probe_ema = bank.stats[slice(*probes)]  # [R + C]
        self.age = bank.age[slice(*blocks)].view(rows, k)  # [R, K]
        self.ratio = bank.ratio[index]  # []
        self.protected = bank.protected[slice(*blocks)].view(rows, k)  # [R, K]
        self.kept = bank.kept[slice(*blocks)].view(rows, k)  # [R, K]
        self.released = bank.released[slice(*blocks)].view(rows, k)  # [R, K]
        self.old_importance = torch.zeros(rows, cols, dtype=STATS_DTYPE, device=bank.device)  # [R, C]
        self._finite = (bank.finite[slice(*blocks)], bank.finite[slice(*probes)])
        self.swaps_total = 0
        self.any_protected = False  # host copy of protected.any(), so unprotected layers cost no sync
        self.any_kept = self.any_record = False  # host copies of kept.any() and old_importance.any(), likewise

    def has_protected(self) -> bool:
        return self.any_protected

    def set_protected(self, mask: torch.Tensor | None) -> None:
        if mask is None:
            self.protected.zero_()
        else:
            self.protected.copy_(mask)
        self.any_protected = bool(self.protected.any())

    @property
    def error_norm(self) -> torch.Tensor:
        """EMA of the per-block-row output-gradient norm: [R]."""
        return self.probe_ema[: self.num_rows]

    @property
    def activation_norm(self) -> torch.Tensor:
        """EMA of the per-block-column input norm: [C]."""
        return self.probe_ema[self.num_rows :]

    def nonfinite(self) -> torch.Tensor:
        """[] bool on the device: a non-finite statistic arrived since the last decision."""
        blocks, probes = self._finite
        return ~(blocks.all() & probes.all())

    def state_dict(self) -> dict:
        out = {name: getattr(self, name).detach().clone() for name in self.TENSORS + self.OPTIONAL_TENSORS}
        out["nonfinite"] = self.nonfinite()
        out["swaps_total"] = self.swaps_total
        return out

    def load_state_dict(self, state: dict) -> None:
        """Copy a state that ``sparsify.topology.checkpoint.validate`` accepted (shapes, fields)."""
        for name in self.TENSORS:
            getattr(self, name).copy_(state[name])
        for name in self.OPTIONAL_TENSORS:
            getattr(self, name).copy_(state[name]) if name in state else getattr(self, name).zero_()
        finite = ~torch.as_tensor(state.get("nonfinite", False), device=self.age.device)  # absent in older checkpoints
        for flags in self._finite:
            flags.copy_(finite.expand_as(flags))
        self.swaps_total = int(state["swaps_total"])
        self.any_protected = bool(self.protected.any())
        self.any_kept, self.any_record = bool(self.kept.any()), bool(self.old_importance.any())


@dataclass
class ShapeGroup:
    """Layers of one bank with the same (R, K, C, B): their statistics are contiguous ``[L, ...]`` stacks."""

    members: list[int]  # bank indices, in model order
    rows: int
    k: int
    cols: int
    block_size: int
    blocks: tuple[int, int]  # element range of their block statistics in the bank's flat buffers
    probes: tuple[int, int]  # element range of their probe statistics

    @property
    def first(self) -> int:
        return self.members[0]

    def block_view(self, flat: torch.Tensor) -> torch.Tensor:
        """``[L, R, K]`` view of a block-indexed flat buffer (stats, age, protected, finite)."""
        return flat[self.blocks[0] : self.blocks[1]].view(len(self.members), self.rows, self.k)

    def probe_view(self, flat: torch.Tensor) -> torch.Tensor:
        """``[L, R + C]`` view of the probe statistics: error norms ``[:, :R]``, activation norms ``[:, R:]``."""
        return flat[self.probes[0] : self.probes[1]].view(len(self.members), self.rows + self.cols)


class ScoreBank:
    """The statistics of all evolved layers on one device, in flat buffers.

    ``stats`` is float64 ``[NB + NP + L]``: every layer's block EMAs (NB = sum of R*K), then every
    layer's probe EMAs (NP = sum of R + C), then one non-finite flag per layer that Level 2 fills and
    all-reduces with the rest. Layers are ordered by shape group, so a group's statistics are one
    contiguous ``[L, R, K]`` / ``[L, R + C]`` view; ``layers`` and ``names`` are in that order.
    """

    def __init__(self, named_layers: list[tuple[str, BlockSparseLinear]]) -> None:
        keys: dict[tuple, list[tuple[str, BlockSparseLinear]]] = {}
        for name, layer in named_layers:
            key = (layer.num_rows, layer.blocks_per_row, layer.num_cols, layer.block_size)
            keys.setdefault(key, []).append((name, layer))
        ordered = [item for members in keys.values() for item in members]
        self.names = [name for name, _ in ordered]
        self.layers = [layer for _, layer in ordered]
        self.device = self.layers[0].values.device
        sizes = [(m.num_rows * m.blocks_per_row, m.num_rows + m.num_cols) for m in self.layers]
        self.num_blocks = sum(b for b, _ in sizes)
        self.num_probes = sum(p for _, p in sizes)
        self.block_range, self.probe_range = [], []
        b, p = 0, self.num_blocks
        for blocks, probes in sizes:
            self.block_range.append((b, b + blocks))
            self.probe_range.append((p, p + probes))
            b, p = b + blocks, p + probes
        size, count, device = self.num_blocks + self.num_probes, len(self.layers), self.device
        self.stats = torch.zeros(size + count, dtype=STATS_DTYPE, device=device)  # EMAs, then the per-layer flags
        self.fresh = torch.zeros(size, dtype=STATS_DTYPE, device=device)  # this step's new values, before the EMA
        self.finite = torch.ones(size, dtype=torch.bool, device=device)  # every new value since the last decision
        self.age = torch.zeros(self.num_blocks, dtype=torch.int64, device=device)
        self.ratio = torch.ones(count, dtype=STATS_DTYPE, device=device)
        self.protected = torch.zeros(self.num_blocks, dtype=torch.bool, device=device)
        self.kept = torch.zeros(self.num_blocks, dtype=torch.bool, device=device)
        self.released = torch.zeros(self.num_blocks, dtype=torch.bool, device=device)
        self.any_released = False  # host hint: released slots may remain (decisions then rank them first)
        self.scores = [LayerScores(self, i, layer) for i, layer in enumerate(self.layers)]
        self._fresh = [(self.fresh[b0:b1].view_as(s.block_ema), self.fresh[p0:p1])  # per layer, made once
                       for s, (b0, b1), (p0, p1) in zip(self.scores, self.block_range, self.probe_range)]
        self.groups: list[ShapeGroup] = []
        start = 0
        for (rows, k, cols, block), members in keys.items():
            index = list(range(start, start + len(members)))
            start += len(members)
            self.groups.append(ShapeGroup(
                index, rows, k, cols, block,
                (self.block_range[index[0]][0], self.block_range[index[-1]][1]),
                (self.probe_range[index[0]][0], self.probe_range[index[-1]][1]),
            ))

    @property
    def flags(self) -> torch.Tensor:
        """[L]: per-layer non-finite flags (filled by :meth:`synchronize`)."""
        return self.stats[self.num_blocks + self.num_probes :]

    # -- Level 0 ---------------------------------------------------------------------------------
    def update(self, scorer: str, score_ema: float, candidate_ema: float) -> None:
        """Fold this step's gradient norms and probe energies into the EMAs; clear the probes.

        Layers without a gradient this step (unused, or frozen) keep their EMAs; so does every entry
        whose new value is not finite (the layer is marked). No host synchronization. Under FSDP2 the
        gradient is this rank's shard: only its rows of ``block_ema`` move (Level 2 gathers them).
        """
        nb = self.num_blocks
        blocks = scorer == "gradient"
        keep_dst, keep_src, probe_dst, probe_grads = [], [], [], []
        moved = False
        for layer, s, (fresh_blocks, fresh_probes) in zip(self.layers, self.scores, self._fresh):
            if blocks:
                grad = layer.values.grad
                if grad is None:
                    keep_dst.append(fresh_blocks)
                    keep_src.append(s.block_ema)
                elif not fsdp.is_sharded(grad):
                    torch.linalg.vector_norm(grad, dim=(2, 3), dtype=STATS_DTYPE, out=fresh_blocks)
                    moved = True
                else:  # this rank's rows; the others keep their EMAs
                    first, stop = fsdp.row_range(grad)
                    torch.linalg.vector_norm(fsdp.local(grad), dim=(2, 3), dtype=STATS_DTYPE,
                                             out=fresh_blocks[first:stop])
                    for lo, hi in ((0, first), (stop, s.num_rows)):
                        if hi > lo:
                            keep_dst.append(fresh_blocks[lo:hi])
                            keep_src.append(s.block_ema[lo:hi])
                    moved = True
            probe = layer.stats_probe
            if probe.grad is None:
                keep_dst.append(fresh_probes)
                keep_src.append(s.probe_ema)
            else:
                probe_dst.append(fresh_probes)
                probe_grads.append(probe.grad)
                probe.grad = None  # the next step starts fresh; micro-batches of one step accumulate into it
                moved = True
        if not moved:
            return
        if probe_grads:
            torch._foreach_copy_(probe_dst, probe_grads)
            self.fresh[nb:].sqrt_()  # energies are sums of squares: their square roots are the norms
        if keep_dst:  # unchanged entries: new value = EMA (after the sqrt, which must not touch them)
            torch._foreach_copy_(keep_dst, keep_src)
        lo = 0 if blocks else nb
        fresh, ema = self.fresh[lo:], self.stats[lo : nb + self.num_probes]
        finite = _finite(fresh)
        torch.where(finite, fresh, ema, out=fresh)
        self.finite[lo:].logical_and_(finite)
        if blocks:
            ema[:nb].lerp_(fresh[:nb], 1.0 - score_ema)
        self.stats[nb : nb + self.num_probes].lerp_(self.fresh[nb:], 1.0 - candidate_ema)

    # -- Level 1 ---------------------------------------------------------------------------------
    def advance_ages(self, steps: int) -> None:
        """Every block grew ``steps`` steps older."""
        if steps > 0:
            self.age.add_(steps)

    def block_scores(self, group: ShapeGroup, scorer: str) -> torch.Tensor:
        """The score of every active block of the group: ``[L, R, K]`` float64 (higher is more important)."""
        if scorer == "gradient":
            return group.block_view(self.stats)
        return torch.stack([block_magnitudes(self.layers[i].values) for i in group.members])

    def col_indices(self, group: ShapeGroup) -> torch.Tensor:
        """The group's topologies: ``[L, R, K]`` int64 (a copy)."""
        return torch.stack([self.layers[i].col_indices for i in group.members]).long()

    def calibrate(self, group: ShapeGroup, block: torch.Tensor, cols: torch.Tensor) -> None:
        """Refit the group's ``ratio`` so candidate scores are comparable with block scores."""
        probes = group.probe_view(self.stats)
        error, activation = probes[:, : group.rows], probes[:, group.rows :]  # [L, R], [L, C]
        bound = error[:, :, None] * activation.gather(1, cols.flatten(1)).view_as(cols)  # [L, R, K]
        total = bound.sum((1, 2))
        fitted = block.sum((1, 2)) / total.clamp_min(torch.finfo(total.dtype).tiny)
        self.ratio[group.first : group.first + len(group.members)] = torch.where(total > 0, fitted, torch.ones_like(fitted))

    def calibrate_all(self, scorer: str) -> None:
        """Level 1: refit every layer's ``ratio``."""
        for group in self.groups:
            self.calibrate(group, self.block_scores(group, scorer), self.col_indices(group))

    def candidate_scores(self, group: ShapeGroup) -> torch.Tensor:
        """Calibrated candidate score of every block position: ``[L, R, C]`` (meaningful where inactive)."""
        probes = group.probe_view(self.stats)
        error, activation = probes[:, : group.rows], probes[:, group.rows :]
        ratio = self.ratio[group.first : group.first + len(group.members)]
        return error[:, :, None] * activation[:, None, :] * ratio[:, None, None]

    # -- Level 2: synchronize, read, absorb ----------------------------------------------------------
    def synchronize(self, process_group, scorer: str) -> None:
        """Make every statistic a decision reads identical on every rank, in ONE all-reduce, and fill
        the per-layer non-finite flags (which travel in the same buffer).

        Probe statistics are local to a rank: averaged. Block EMAs are the same everywhere under DDP
        (averaged gradients): averaged too. Under FSDP2 each rank knows only its own block-rows: the
        other rows are zeroed, then summed."""
        self._collect_nonfinite()
        sharded = [fsdp.is_sharded(m.values) and scorer == "gradient" for m in self.layers]
        if not any(sharded):
            reduce_([self.stats], [], process_group)
            return
        averaged, summed = [self.stats[self.num_blocks :]], []
        for layer, s, shard in zip(self.layers, self.scores, sharded):
            if shard:
                first, stop = fsdp.row_range(layer.values)
                s.block_ema[:first].zero_()
                s.block_ema[stop:].zero_()
                summed.append(s.block_ema)
            else:
                averaged.append(s.block_ema)
        reduce_(averaged, summed, process_group)

    def decision_inputs(self, group: ShapeGroup, scorer: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """What ``decide_layers`` reads for a group, as its keyword arguments (``block_scores``,
        ``candidate_scores``, ``col_indices``, ``protected``, ``allowed``), and the mean block score of
        each layer ``[L]``. Refits the group's ``ratio`` first. Call after :meth:`synchronize`.

        Consolidated (kept) slots are never pruned, like protected ones; released slots count as the
        weakest blocks (score 0), so the next decisions give them to the best candidates first."""
        block = self.block_scores(group, scorer)  # [L, R, K]
        cols = self.col_indices(group)  # [L, R, K]
        self.calibrate(group, block, cols)
        mean_score = block.mean((1, 2))  # a copy: grown slots take new scores after the decision
        protected = group.block_view(self.protected)
        if any(self.scores[i].any_kept for i in group.members):
            protected = protected | group.block_view(self.kept)
        if self.any_released:
            block = torch.where(group.block_view(self.released), torch.zeros_like(block), block)
        members = slice(group.first, group.first + len(group.members))
        return dict(block_scores=block, candidate_scores=self.candidate_scores(group), col_indices=cols,
                    protected=protected, allowed=self.flags[members] == 0), mean_score

    def absorb(self, group: ShapeGroup, decision, scorer: str) -> None:
        """A decision's changed slots start afresh: age 0 and, with the gradient scorer, the calibrated
        candidate score that won them the slot as their block EMA. Called by ``apply.py`` only."""
        if scorer == "gradient":
            ema = group.block_view(self.stats)
            ema.scatter_(2, decision.slots, torch.where(decision.swap, decision.grown_scores, ema.gather(2, decision.slots)))
        group.block_view(self.age).masked_fill_(decision.changed, 0)
        if self.any_released:
            group.block_view(self.released).masked_fill_(decision.changed, False)

    def age_sums(self, group: ShapeGroup, reset: torch.Tensor | None = None) -> torch.Tensor:
        """``[L]`` int64: the sum of the block ages of each layer of the group, counting the slots of
        ``reset [L, R, K]`` (a decision's changed slots, about to be absorbed) as 0."""
        ages = group.block_view(self.age)
        return (ages if reset is None else ages.masked_fill(reset, 0)).sum((1, 2))

    def count_swaps(self, group: ShapeGroup, per_layer: list[int]) -> None:
        for index, num in zip(group.members, per_layer):
            self.scores[index].swaps_total += num

    def restart(self) -> None:
        """Forget the statistics (block and probe EMAs, calibration, non-finite marks): the next task's
        decisions read the next task only. Ages, protected, kept and released slots stay."""
        self.stats.zero_()
        self.ratio.fill_(1.0)
        self.finite.fill_(True)

    def end_decision(self) -> None:
        """The non-finite marks were read with the decision: start collecting afresh."""
        self.finite.fill_(True)

    def _collect_nonfinite(self) -> None:
        """Fill :attr:`flags` (1.0 where a layer saw a non-finite value since the last decision, or holds
        one) and zero any non-finite EMA entry."""
        ema = self.stats[: self.num_blocks + self.num_probes]
        finite = torch.isfinite(ema)
        self.finite.logical_and_(finite)
        ema.masked_fill_(finite.logical_not_(), 0.0)
        for group in self.groups:
            ok = group.block_view(self.finite).flatten(1).all(1) & group.probe_view(self.finite).all(1)
            self.flags[group.first : group.first + len(group.members)] = (~ok).to(self.flags.dtype)


def _finite(x: torch.Tensor) -> torch.Tensor:
    """``torch.isfinite(x)`` in two kernels instead of four: ``x - x`` is 0 exactly when x is finite."""
    return (x - x) == 0


def enable_probe(layer: BlockSparseLinear) -> None:
    """Make the layer's stats probe a float64 leaf that requires grad (re-registered otherwise): its
    gradient, the probe energies, is then float64, which the op computes in the probe's precision."""
    probe = layer.stats_probe
    size = layer.num_rows + layer.num_cols
    if probe.dtype != STATS_DTYPE or probe.device != layer.values.device or probe.numel() != size or not probe.is_leaf:
        layer.stats_probe = torch.zeros(size, dtype=STATS_DTYPE, device=layer.values.device)
    layer.stats_probe.requires_grad_(True)


def block_magnitudes(values: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of every block's weights: ``[R, K, B, B] -> [R, K]`` float64.

    Row-sharded ``values`` (FSDP2) are reduced locally and then all-gathered (one collective per call)."""
    norms = torch.linalg.vector_norm(values.detach(), dim=(2, 3), dtype=STATS_DTYPE)
    return norms.full_tensor() if fsdp.is_sharded(norms) else norms
