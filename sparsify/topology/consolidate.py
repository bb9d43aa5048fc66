"""Ending a task: which blocks the next task must leave alone, and which it may take.

``TopologyOptimizer.consolidate()`` scores every active block's importance for the task just trained,

    importance[r, k] = ||W_b||_F * g_b

where ``W_b`` is the block's weights and ``g_b`` its gradient norm (the block-score EMA with
``scorer="gradient"``; the calibrated estimate ``error_norm[r] * activation_norm[c] * ratio`` with
``scorer="magnitude"``, which keeps no gradient EMA). It bounds the first-order change of the loss
when the block is removed (``|<W_b, g_b>| <= ||W_b|| ||g_b||``), and it is the square root of EWC's
penalty for zeroing the block if the empirical Fisher diagonal ``g^2`` is spread evenly over it: the
saliency of a block, from statistics the optimizer already keeps.

Per layer, with ``n = R * K`` active blocks sorted by importance (ties: the lower slot index first):
  * the top ``round(consolidate_keep * n)`` become *kept*: no later decision prunes them, and they train
    at ``consolidate_lr_scale`` times the learning rate (their optimizer state is never reset). Kept
    slots accumulate over tasks: a block kept for task A stays kept through tasks B and C.
  * the bottom ``round(consolidate_release * n)`` (neither kept nor protected) become *released*: the
    next decisions rank them as the weakest blocks (score 0), so within the per-row quota each is
    swapped for the best candidate column of the new task, until it has been.
It also records each position's importance relative to the layer's mean, ``old[r, c] = importance /
mean(importance)`` at the active blocks' columns and 0 elsewhere (``LayerScores.old_importance``, the
last consolidated task's record). Then the statistics restart (``ScoreBank.restart``), so the next
task's decisions read the next task.

With ``consolidate_rank="specificity"`` (the default), the decisions of a layer with a record rank
by how specific a position's new-task score is to the new task. Candidate columns (what to grow):

    specificity[r, c] = score[r, c] / (1 + old[r, c])  =  mean * score / (importance + mean)

the new-task score over the old-task importance plus an eps (the layer's mean importance), in the
units of the score: a position unused by the old task ranks by its score alone, one at the mean
importance at half of it, so of two equally scored columns the one the old task did not need is
grown (the block-level analogue of sparse memory fine-tuning's TF-IDF ranking). Active blocks (what
to prune) rank by ``score * (1 + old)``: dividing there too would prune first the blocks the old task
needed most, the forgetting the ranking is for; this way of two equally weak blocks the one the old
task needed less is pruned, and a block with a high new-task score stays whatever its past. Both
reduce to the score where ``old`` is 0. The swap threshold compares these ranked scores; the records
and the grown blocks' starting EMA keep the plain ones. With ``consolidate_rank="score"`` decisions
rank by the scores, as before any consolidate().
"""

from __future__ import annotations

import dataclasses

import torch

from sparsify.topology.decide import Decision, decide_layers
from sparsify.topology.scores import ScoreBank, ShapeGroup, block_magnitudes


def block_importance(bank: ScoreBank, group: ShapeGroup, scorer: str) -> torch.Tensor:
    """``[L, R, K]`` float64: the importance of every active block of the group (module docstring)."""
    weights = torch.stack([block_magnitudes(bank.layers[i].values) for i in group.members])  # [L, R, K]
    cols = bank.col_indices(group)
    if scorer == "gradient":
        gradient = group.block_view(bank.stats)
    else:
        candidates = bank.candidate_scores(group)  # [L, R, C]
        gradient = candidates.gather(2, cols)
    return weights * gradient


def consolidate_bank(bank: ScoreBank, config, process_group) -> dict[str, torch.Tensor]:
    """Mark the kept and released slots of every layer of ``bank``; restart its statistics. Returns
    each layer's importance ``[R, K]`` (on its device). The same on every rank: the statistics are
    synchronized first, as for a decision."""
    bank.synchronize(process_group, config.scorer)
    out = {}
    for group in bank.groups:
        bank.calibrate(group, bank.block_scores(group, config.scorer), bank.col_indices(group))
        importance = block_importance(bank, group, config.scorer)  # [L, R, K]
        layers, n = len(group.members), group.rows * group.k
        order = torch.sort(importance.reshape(layers, n), dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=order.device).expand(layers, n))
        rank = rank.view_as(importance)  # 0 = the most important block of its layer
        kept = group.block_view(bank.kept)
        kept |= rank < round(config.consolidate_keep * n)
        released = rank >= n - round(config.consolidate_release * n)
        group.block_view(bank.released).copy_(released & ~kept & ~group.block_view(bank.protected))
        _record(bank, group, importance, bank.col_indices(group))
        out.update(zip((bank.names[i] for i in group.members), importance.unbind(0)))
    for s in bank.scores:
        # host reads, once per task: consolidate() is not on the step path
        s.any_kept, s.any_record = bool(s.kept.any()), bool(s.old_importance.any())
    bank.any_released = config.consolidate_release > 0
    bank.restart()
    bank.end_decision()
    return out


def _record(bank: ScoreBank, group: ShapeGroup, importance: torch.Tensor, cols: torch.Tensor) -> None:
    """Write every layer's ``old_importance [R, C]``: importance over the layer's mean at its active
    columns, 0 at the others (and everywhere in a layer whose importance is all 0)."""
    mean = importance.mean((1, 2), keepdim=True)  # [L, 1, 1]
    relative = torch.where(mean > 0, importance / mean.clamp_min(torch.finfo(mean.dtype).tiny), 0.0)
    for j, i in enumerate(group.members):
        bank.scores[i].old_importance.zero_().scatter_(1, cols[j], relative[j])


def old_importance(bank: ScoreBank, group: ShapeGroup) -> torch.Tensor:
    """``[L, R, C]`` float64: the group's records of the last consolidated task (a copy)."""
    return torch.stack([bank.scores[i].old_importance for i in group.members])


def decide_by_specificity(inputs: dict[str, torch.Tensor], old: torch.Tensor, config, seed: int) -> Decision:
    """``decide_layers(**inputs)`` ranking by specificity (module docstring) instead of by score, for
    ``old [L, R, C]`` the layers' records. The decision's pair scores are the plain scores. Pure, on
    the device, no host synchronization."""
    scale = 1.0 + old  # [L, R, C], >= 1: finite scores stay finite, non-finite ones stay non-finite
    ranked = dict(inputs, block_scores=inputs["block_scores"] * scale.gather(2, inputs["col_indices"]),
                  candidate_scores=inputs["candidate_scores"] / scale)
    decision = decide_layers(config=config, seed=seed, **ranked)
    precision = decision.pruned_scores.dtype
    return dataclasses.replace(
        decision, pruned_scores=inputs["block_scores"].to(precision).gather(2, decision.slots),
        grown_scores=inputs["candidate_scores"].to(precision).gather(2, decision.grown_cols))
