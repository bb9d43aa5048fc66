"""Per-block statistics for topology decisions: what each layer remembers between decisions.

For a layer with R block-rows, K slots and C block-columns, :class:`LayerScores` holds

    block_ema:  [R, K] float32  EMA of ||dL/dvalues[r, k]||_F (scorer="gradient"), updated every step (Level 0)
    probe_ema:  [R + C] float32 EMA of sqrt(probe energy): error_norm [R] then activation_norm [C]
    age:        [R, K] int64    steps since each block was grown (or since training started)
    ratio:      [] float32      calibration of candidate scores against block scores (Level 1)
    protected:  [R, K] bool     slots that are neither pruned nor trained (see TopologyOptimizer.protect)

All EMAs follow ``ema = a * ema + (1 - a) * new``. Every-step work is a handful of device kernels
with no host synchronization; a non-finite gradient poisons the EMA, which the Level 2 decision
detects, skips and repairs (see ``repair_nonfinite``).

Candidate scores: a would-be block (r, c) has gradient ``G_r^T X_c`` whose norm is at most
``||G_r|| * ||X_c|| = error_norm[r] * activation_norm[c]``. That bound always beats real blocks, so
it is scaled by ``ratio``, fitted on the active blocks where both the real score and the bound are
known: ``ratio = sum(block_score) / sum(error_norm[r] * activation_norm[col])`` over active blocks.
"""

from __future__ import annotations

import torch

from sparsify.layer import BlockSparseLinear
from sparsify.topology import fsdp

_TINY = 1e-30


class LayerScores:
    """The statistics of one BlockSparseLinear (all tensors on the layer's device)."""

    TENSORS = ("block_ema", "probe_ema", "age", "ratio", "protected")

    def __init__(self, layer: BlockSparseLinear) -> None:
        rows, k, cols = layer.num_rows, layer.blocks_per_row, layer.num_cols
        device = layer.values.device
        self.num_rows, self.num_cols = rows, cols
        self.block_ema = torch.zeros(rows, k, device=device)  # [R, K]
        self.probe_ema = torch.zeros(rows + cols, device=device)  # [R + C]
        self.age = torch.zeros(rows, k, dtype=torch.int64, device=device)  # [R, K]
        self.ratio = torch.ones((), device=device)  # []
        self.protected = torch.zeros(rows, k, dtype=torch.bool, device=device)  # [R, K]
        self.swaps_total = 0
        self.any_protected = False  # host copy of protected.any(), so unprotected layers cost no sync

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

    def state_dict(self) -> dict:
        out = {name: getattr(self, name).detach().clone() for name in self.TENSORS}
        out["swaps_total"] = self.swaps_total
        return out

    def load_state_dict(self, state: dict, where: str) -> None:
        for name in self.TENSORS:
            mine, theirs = getattr(self, name), state[name]
            if tuple(theirs.shape) != tuple(mine.shape):
                raise ValueError(
                    f"{where}: checkpoint {name} has shape {tuple(theirs.shape)} but this layer needs "
                    f"{tuple(mine.shape)}; sparsify the model the same way before loading the optimizer state"
                )
            mine.copy_(theirs)
        self.swaps_total = int(state["swaps_total"])
        self.any_protected = bool(self.protected.any())


def enable_probe(layer: BlockSparseLinear) -> None:
    """Make the layer's stats probe a float32 leaf that requires grad (re-registered if it was cast)."""
    probe = layer.stats_probe
    size = layer.num_rows + layer.num_cols
    if probe.dtype != torch.float32 or probe.device != layer.values.device or probe.numel() != size or not probe.is_leaf:
        layer.stats_probe = torch.zeros(size, device=layer.values.device)
    layer.stats_probe.requires_grad_(True)


def block_gradient_norms(grad: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of every block of ``dL/dvalues``: ``[R, K, B, B] -> [R, K]`` float32."""
    return torch.linalg.vector_norm(grad, dim=(2, 3), dtype=torch.float32)


def block_magnitudes(values: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of every block's weights: ``[R, K, B, B] -> [R, K]`` float32.

    Row-sharded ``values`` (FSDP2) are reduced locally and then all-gathered (one collective per call)."""
    norms = torch.linalg.vector_norm(values.detach(), dim=(2, 3), dtype=torch.float32)
    return norms.full_tensor() if fsdp.is_sharded(norms) else norms


def update_every_step(
    scores: list[LayerScores], layers: list[BlockSparseLinear], scorer: str, score_ema: float, candidate_ema: float
) -> None:
    """Level 0: fold this step's gradient norms and probe energies into the EMAs; clear the probes.

    Layers without a gradient this step (unused, or frozen) keep their EMAs. No host synchronization.
    Under FSDP2 the gradient is this rank's shard: only its rows of ``block_ema`` move (Level 2 gathers them).
    """
    block_emas, block_news, probe_emas, probe_grads = [], [], [], []
    for s, layer in zip(scores, layers):
        grad = layer.values.grad
        if scorer == "gradient" and grad is not None:
            first, stop = fsdp.row_range(grad)
            block_emas.append(s.block_ema[first:stop])
            block_news.append(block_gradient_norms(fsdp.local(grad)))
        probe = layer.stats_probe
        if probe.grad is not None:
            probe_emas.append(s.probe_ema)
            probe_grads.append(probe.grad)
            probe.grad = None  # the next step starts fresh; micro-batches of one step accumulate into it
    if block_emas:
        torch._foreach_lerp_(block_emas, block_news, 1.0 - score_ema)
    if probe_emas:  # energies are sums of squares: their square roots are the norms
        torch._foreach_lerp_(probe_emas, torch._foreach_sqrt(probe_grads), 1.0 - candidate_ema)


def block_scores(s: LayerScores, layer: BlockSparseLinear, scorer: str) -> torch.Tensor:
    """The score of every active block: ``[R, K]`` float32 (higher is more important)."""
    return s.block_ema if scorer == "gradient" else block_magnitudes(layer.values)


def raw_candidate_scores(s: LayerScores) -> torch.Tensor:
    """``error_norm[r] * activation_norm[c]`` for every block position: ``[R, C]``, uncalibrated."""
    return s.error_norm[:, None] * s.activation_norm[None, :]


def calibrate(s: LayerScores, layer: BlockSparseLinear, scorer: str) -> None:
    """Level 1: refit ``ratio`` so candidate scores are comparable with block scores."""
    active = block_scores(s, layer, scorer)  # [R, K]
    bound = s.error_norm[:, None] * s.activation_norm[layer.col_indices.long()]  # [R, K]
    fitted = active.sum() / bound.sum().clamp_min(_TINY)
    s.ratio.copy_(torch.where(bound.sum() > 0, fitted, torch.ones_like(fitted)))


def candidate_scores(s: LayerScores) -> torch.Tensor:
    """Calibrated candidate score of every block position: ``[R, C]`` (meaningful where inactive)."""
    return raw_candidate_scores(s) * s.ratio


def advance_ages(scores: list[LayerScores], steps: int) -> None:
    """Level 1: every block grew ``steps`` steps older."""
    if steps > 0:
        torch._foreach_add_([s.age for s in scores], steps)


def repair_nonfinite(s: LayerScores) -> bool:
    """Zero every non-finite EMA entry; True when there was one (one host sync, Level 2 only)."""
    bad = False
    for t in (s.block_ema, s.probe_ema, s.ratio):
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            t.copy_(torch.where(finite, t, torch.zeros_like(t)))
            bad = True
    return bad
