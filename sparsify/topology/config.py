"""TopologyConfig: how the topology evolves (the levels' periods, the decision rule, new-block init)."""

from __future__ import annotations

import math
from dataclasses import dataclass

GROW_INITS = ("kaiming", "zeros")
SCORERS = ("gradient", "magnitude")
CONSOLIDATE_RANKS = ("specificity", "score")


@dataclass
class TopologyConfig:
    """How the topology evolves. EMAs follow ``ema = a * ema + (1 - a) * new``.

    Attributes:
        score_every: Level 1 period in steps (calibration of candidate scores, block ages).
        update_every: Level 2 period in steps (topology decisions).
        prune_fraction: at most ``ceil(prune_fraction * K)`` blocks per row are swapped per decision.
        swap_threshold: a candidate replaces a block only when its score is this many times higher.
        epsilon: probability that a prunable block is swapped for a random unused column instead.
        score_ema: ``a`` of the block-score EMA (0.95: about a 20-step window).
        candidate_ema: ``a`` of the activation / error norm EMAs behind candidate scores.
        grow_init: ``"kaiming"`` (nn.Linear's Kaiming-uniform, scaled by 0.1) or ``"zeros"`` for new blocks.
        scorer: ``"gradient"`` (EMA of the block gradient norm) or ``"magnitude"`` (block weight norm).
        seed: seeds every decision's generator together with the step.
        history_size: how many decision records (one per layer per Level 2) ``history`` keeps; None: all.
        consolidate_keep: at ``TopologyOptimizer.consolidate()`` (the end of a task), the fraction of each
            layer's active blocks, the most important for that task, that later decisions never prune.
        consolidate_lr_scale: those blocks then train at this multiple of the learning rate (0 freezes
            them like ``protect()``, 1 leaves their learning rate alone); their optimizer state is kept.
        consolidate_release: the fraction of each layer's blocks, the least important for the task
            just ended, that the next decisions prune first, to grow the next task's blocks there.
        consolidate_rank: how the decisions of a layer after ``consolidate()`` rank its blocks and
            candidate columns: ``"specificity"`` (a column's new-task score / (1 + its old-task
            importance relative to the layer's mean), so growth goes where the new task needs it and
            the old task did not; a block's score * (1 + that), so blocks the old task needed are pruned
            last) or ``"score"`` (the new-task score alone). Layers never consolidated rank by score.
    """

    score_every: int = 10
    update_every: int = 100
    prune_fraction: float = 0.1
    swap_threshold: float = 1.5
    epsilon: float = 0.05
    score_ema: float = 0.95
    candidate_ema: float = 0.99
    grow_init: str = "kaiming"
    scorer: str = "gradient"
    seed: int = 0
    history_size: int | None = 10_000
    consolidate_keep: float = 0.2
    consolidate_lr_scale: float = 0.1
    consolidate_release: float = 0.1
    consolidate_rank: str = "specificity"

    def __post_init__(self) -> None:
        for name in ("score_every", "update_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TopologyConfig: {name}={value!r} must be a positive number of steps, e.g. {name}=10")
        _check_fraction("prune_fraction", self.prune_fraction, "0.1 swaps up to 10% of each row's blocks")
        _check_fraction("epsilon", self.epsilon, "0.05 explores at random 5% of the time")
        for name in ("score_ema", "candidate_ema"):
            value = getattr(self, name)
            _check_fraction(name, value, "0.95 averages over about 20 steps")
            if value >= 1.0:
                raise ValueError(f"TopologyConfig: {name}={value!r} must be below 1, or the EMA never learns anything")
        if not isinstance(self.swap_threshold, (int, float)) or not math.isfinite(self.swap_threshold) or self.swap_threshold < 0:
            raise ValueError(f"TopologyConfig: swap_threshold={self.swap_threshold!r} must be a finite number >= 0, e.g. 1.5")
        if self.grow_init not in GROW_INITS:
            raise ValueError(f"TopologyConfig: grow_init={self.grow_init!r} is not one of {GROW_INITS}")
        if self.scorer not in SCORERS:
            raise ValueError(f"TopologyConfig: scorer={self.scorer!r} is not one of {SCORERS}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"TopologyConfig: seed={self.seed!r} must be an int")
        _check_fraction("consolidate_keep", self.consolidate_keep, "0.2 keeps the most important 20% of the blocks")
        _check_fraction("consolidate_lr_scale", self.consolidate_lr_scale, "0.1 trains consolidated blocks 10x slower")
        _check_fraction("consolidate_release", self.consolidate_release, "0.1 frees the least important 10%")
        if self.consolidate_keep + self.consolidate_release > 1.0:
            raise ValueError(
                f"TopologyConfig: consolidate_keep={self.consolidate_keep!r} + consolidate_release="
                f"{self.consolidate_release!r} exceed 1: a block cannot be both kept and released"
            )
        if self.consolidate_rank not in CONSOLIDATE_RANKS:
            raise ValueError(f"TopologyConfig: consolidate_rank={self.consolidate_rank!r} is not one of {CONSOLIDATE_RANKS}")
        if self.history_size is not None and (not isinstance(self.history_size, int) or self.history_size < 0):
            raise ValueError(f"TopologyConfig: history_size={self.history_size!r} must be None or an int >= 0")


def _check_fraction(name: str, value, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"TopologyConfig: {name}={value!r} must be a number in [0, 1]; e.g. {hint}")
