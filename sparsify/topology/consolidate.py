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
Then the statistics restart (``ScoreBank.restart``), so the next task's decisions read the next task.
"""

from __future__ import annotations

import torch

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
        out.update(zip((bank.names[i] for i in group.members), importance.unbind(0)))
    for s in bank.scores:
        s.any_kept = bool(s.kept.any())  # a host read, once per task: consolidate() is not on the step path
    bank.any_released = config.consolidate_release > 0
    bank.restart()
    bank.end_decision()
    return out
