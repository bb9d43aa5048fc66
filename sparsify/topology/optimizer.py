"""TopologyOptimizer: wraps any optimizer and evolves the block topology of a sparsified model.

    opt = TopologyOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-4), model, TopologyConfig(update_every=100))
    loss.backward(); opt.step(); opt.zero_grad()

Three levels, counted in calls to ``step()``:
  Level 0, every step: the wrapped optimizer's step, then per-block score EMAs (from ``values.grad``)
      and candidate statistics (from the layers' stats probes): one norm kernel per layer and a few
      kernels over all layers' flat statistics (``scores.ScoreBank``); no host synchronization.
  Level 1, every ``score_every`` steps: candidate scores are recalibrated against block scores, ages
      advance; a few kernels per group of same-shaped layers, no host synchronization.
  Level 2, every ``update_every`` steps, one way: statistics (``ScoreBank.synchronize``: identical on
      every rank) -> decide (``decide_layers``, per group of same-shaped layers, on the device) -> apply
      (``apply.py``, the only writer of a decision) -> record (``records.py``). Between deciding and
      applying, the host reads the decision records, the non-finite flags and the cross-rank topology
      check in ONE transfer: one host synchronization per event (per device holding evolved layers),
      however many layers there are.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from sparsify.layer import BlockSparseLinear
from sparsify.topology import checkpoint, fsdp
from sparsify.topology.apply import apply_decisions
from sparsify.topology.config import TopologyConfig
from sparsify.topology.consolidate import consolidate_bank, decide_by_specificity, old_importance
from sparsify.topology.decide import decide_layers
from sparsify.topology.distributed import check_same_topology, process_group_of, raise_if_diverged, unwrap
from sparsify.topology.metrics import decision_metrics
from sparsify.topology.random import decision_generator, draw_seeds
from sparsify.topology.records import GroupRecord, Swaps, TopologyDecision, column_counts, fetch, layer_records
from sparsify.topology.scores import ScoreBank, enable_probe

logger = logging.getLogger("sparsify.topology")

DecisionCallback = Callable[[int, dict, list], None]


def _wrapped(name: str) -> property:
    """A property that reads and writes the wrapped optimizer's attribute ``name`` (its own object)."""
    return property(lambda self: getattr(self.optimizer, name), lambda self, value: setattr(self.optimizer, name, value))


class TopologyOptimizer(torch.optim.Optimizer):
    """Wraps ``optimizer`` (any torch.optim.Optimizer) and evolves the topology of ``model``'s
    BlockSparseLinear layers. It is an Optimizer itself (LR schedulers, GradScaler and the HF
    ``Trainer(optimizers=(opt, scheduler))`` accept it); ``param_groups``, ``state``, ``defaults`` are
    the wrapped optimizer's own objects.

    Build it after the model is on its device and dtype (and after DDP wrapping, if any) and before the
    first forward of a compiled model: it turns on each layer's ``stats_probe``. ``model`` may be the
    plain model, its ``torch.compile`` wrapper or its DDP wrapper (see ``sparsify.topology.distributed``),
    or a model sharded by FSDP2's ``fully_shard`` (see ``sparsify.topology.fsdp``; build it after sharding).
    Only layers whose ``values`` the wrapped optimizer trains are evolved.

    Args:
        on_decision: optional ``fn(step, metrics, records)`` called after every Level 2 event, with
            ``metrics`` a flat dict (``"topology/swap_rate"`` ...) ready for TensorBoard and ``records``
            this event's :class:`TopologyDecision` list. More via :meth:`add_callback`.
        process_group: the group decisions are synchronized over (default: DDP's, else the world).

    Attributes:
        history: list of TopologyDecision, one per layer per Level 2 event (oldest dropped past
            ``config.history_size``).
        layer_scores: ``{layer name: LayerScores}`` (block EMAs, ages, protected slots ...), views into
            ``banks``: one ``ScoreBank`` per device holding evolved layers (the flat statistics of its layers).
        global_step: number of ``step()`` calls so far.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        config: TopologyConfig | None = None,
        *,
        on_decision: DecisionCallback | None = None,
        process_group=None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer) or isinstance(optimizer, TopologyOptimizer):
            raise TypeError(
                f"TopologyOptimizer wraps a torch.optim.Optimizer such as AdamW, got {type(optimizer).__name__}"
            )
        # Optimizer.__init__ is not called: it would build new param groups and state, and schedulers,
        # GradScaler and the HF Trainer must see (and write) the wrapped optimizer's own. Only its hook
        # tables are set up, and _patch_step_function (what __init__ calls) makes step() run them, so
        # register_step_pre/post_hook work on the wrapper. Registering hooks on the wrapped optimizer
        # instead would not do: protected slots must be zeroed after a closure's backward, inside the
        # step, and schedulers need an Optimizer whose step() is the one training calls.
        self.optimizer = optimizer
        self.config = config if config is not None else TopologyConfig()
        for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
                     "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
                     "_optimizer_load_state_dict_post_hooks"):
            setattr(self, name, OrderedDict())
        self._patch_step_function()
        trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self.layers: dict[str, BlockSparseLinear] = {
            name: m for name, m in unwrap(model).named_modules()
            if isinstance(m, BlockSparseLinear) and id(m.values) in trained
        }
        if not self.layers:
            raise ValueError(
                "TopologyOptimizer: the model has no BlockSparseLinear layer whose values the optimizer trains; "
                "call sparsify(model, ...) first and build the optimizer from model.parameters()"
            )
        for layer in self.layers.values():
            enable_probe(layer)
        by_device: dict[torch.device, list] = {}
        for name, layer in self.layers.items():
            by_device.setdefault(layer.values.device, []).append((name, layer))
        self.banks = [ScoreBank(named) for named in by_device.values()]  # one per device, usually one
        scores = {name: s for bank in self.banks for name, s in zip(bank.names, bank.scores)}
        self.layer_scores = {name: scores[name] for name in self.layers}
        self.process_group = process_group_of(model, process_group)
        self.global_step = 0
        self._last_age_step = 0
        self._warned_nonfinite = False
        self.history: list[TopologyDecision] = []
        self._callbacks: list[DecisionCallback] = [on_decision] if on_decision is not None else []

    # -- the wrapped optimizer's objects ---------------------------------------------------------
    param_groups = _wrapped("param_groups")
    state = _wrapped("state")
    defaults = _wrapped("defaults")

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    def add_callback(self, fn: DecisionCallback) -> None:
        """Call ``fn(step, metrics, records)`` after every Level 2 event."""
        self._callbacks.append(fn)

    def __repr__(self) -> str:
        return f"TopologyOptimizer({self.optimizer!r}, {len(self.layers)} layers, {self.config})"

    # -- protected slots -------------------------------------------------------------------------
    def protect(self, layer: str | BlockSparseLinear, mask: torch.Tensor | None) -> None:
        """Freeze slots: ``mask`` is bool ``[R, K]`` (True = protected), None clears the layer's mask.

        A protected slot is never pruned (so its column stays), its gradient is zeroed before the
        wrapped optimizer's step (so it adds nothing to momentum) and its values are restored after
        that step (so weight decay or old momentum cannot move them either): the block is frozen.
        Protection is per slot, stored in the optimizer state and checkpointed.
        """
        name = self._layer_name(layer)
        s = self.layer_scores[name]
        if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != tuple(s.protected.shape)):
            raise ValueError(
                f"{name}: protect() needs a bool mask of shape {tuple(s.protected.shape)} ([R, K], one entry per slot), "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        s.set_protected(mask)

    def consolidate(self) -> dict[str, torch.Tensor]:
        """End a task: score every active block's importance for the task just trained, then, for the
        tasks that follow, never prune the ``config.consolidate_keep`` most important blocks of each
        layer and train them at ``config.consolidate_lr_scale`` times the learning rate (their optimizer
        state is kept), and prune the ``config.consolidate_release`` least important first, to grow the
        next task's blocks there. With ``config.consolidate_rank="specificity"`` the next decisions grow
        the columns whose new-task score is highest relative to their old-task importance and prune
        the blocks the old task needed last, so growth goes where the new task needs it and the old
        task did not. The statistics restart for the next task. Every rank must call it at the same
        step (it synchronizes the statistics, as a decision does). See ``sparsify.topology.consolidate``.

        Returns ``{layer name: importance [R, K]}`` (float64, on the layer's device)."""
        with torch.no_grad():
            out = {}
            for bank in self.banks:
                out.update(consolidate_bank(bank, self.config, self.process_group))
        return {name: out[name] for name in self.layers}

    def _layer_name(self, layer: str | BlockSparseLinear) -> str:
        if isinstance(layer, str):
            if layer not in self.layers:
                raise KeyError(f"{layer!r} is not a layer this TopologyOptimizer evolves; known: {list(self.layers)[:5]} ...")
            return layer
        for name, m in self.layers.items():
            if m is layer:
                return name
        raise KeyError("this BlockSparseLinear is not evolved by this TopologyOptimizer")

    # -- the step --------------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """The wrapped optimizer's zero_grad, and a fresh start for the stats probes."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        for layer in self.layers.values():
            layer.stats_probe.grad = None

    def step(self, closure=None):
        """Level 0 (the wrapped step and score EMAs), then Level 1 / Level 2 when their period is due."""
        frozen = self._frozen()

        def masked_closure():
            with torch.enable_grad():
                loss = closure()
            _zero_protected_grads(frozen)
            return loss

        _zero_protected_grads(frozen)
        loss = self.optimizer.step(masked_closure if closure is not None else None)
        with torch.no_grad():
            for f in frozen:
                local = fsdp.local(f.values)
                if f.kept is not None:  # the step's change, scaled: the learning rate of those slots, scaled
                    local.copy_(torch.where(f.kept, torch.lerp(f.saved, local, self.config.consolidate_lr_scale), local))
                local.copy_(torch.where(f.protected, f.saved, local))
            self._after_step()
        return loss

    def _frozen(self) -> list[_Frozen]:
        # protected and kept masks have host flags too, so the common case costs no sync
        scaled = self.config.consolidate_lr_scale != 1.0
        out = []
        for name, layer in self.layers.items():
            s = self.layer_scores[name]
            if s.has_protected() or (scaled and s.any_kept):  # under FSDP2: this rank's rows only
                first, stop = fsdp.row_range(layer.values)
                local = fsdp.local(layer.values.detach())
                kept = s.kept[first:stop, :, None, None] if scaled and s.any_kept else None
                out.append(_Frozen(layer.values, s.protected[first:stop, :, None, None], kept, local.clone()))
        return out

    def _after_step(self) -> None:
        self.global_step += 1
        config, step = self.config, self.global_step
        self._level0()
        if step % config.score_every == 0:
            self._level1()
        if step % config.update_every == 0:
            self._level2()

    def _level0(self) -> None:
        for bank in self.banks:
            bank.update(self.config.scorer, self.config.score_ema, self.config.candidate_ema)

    def _level1(self) -> None:
        for bank in self.banks:
            bank.advance_ages(self.global_step - self._last_age_step)
            bank.calibrate_all(self.config.scorer)
        self._last_age_step = self.global_step

    def _level2(self) -> None:
        start = time.perf_counter()
        step = self.global_step
        for bank in self.banks:
            bank.advance_ages(step - self._last_age_step)
        self._last_age_step = step
        # every random number of this event comes from one seed per group, drawn in a fixed order
        seeds = iter(draw_seeds(decision_generator(self.config.seed, step), sum(len(bank.groups) for bank in self.banks)))
        records: dict[str, TopologyDecision] = {}
        for bank in self.banks:
            records.update(self._decide(bank, [next(seeds) for _ in bank.groups], step))
        ordered = [records[name] for name in self.layers]
        seconds = (time.perf_counter() - start) / len(ordered)
        for record in ordered:
            record.seconds = seconds
            if record.skipped is not None:
                self._warn_nonfinite(step, record.layer)
        self._publish(step, ordered)

    @torch.no_grad()
    def _decide(self, bank: ScoreBank, seeds: list[int], step: int) -> dict[str, TopologyDecision]:
        """Statistics -> decide -> apply -> record, for every layer of ``bank``. The host waits for the
        device once (``fetch``), after the decisions and before they are applied."""
        config = self.config
        bank.synchronize(self.process_group, config.scorer)  # identical statistics on every rank
        decisions, device_records = [], []
        specific = config.consolidate_rank == "specificity"  # consolidated layers rank by specificity
        for group, seed in zip(bank.groups, seeds):
            inputs, mean_score = bank.decision_inputs(group, config.scorer)
            if specific and any(bank.scores[i].any_record for i in group.members):
                decision = decide_by_specificity(inputs, old_importance(bank, group), config, seed)
            else:
                decision = decide_layers(config=config, seed=seed, **inputs)
            decisions.append(decision)
            device_records.append(GroupRecord.of(
                decision, mean_score=mean_score, age_sum=bank.age_sums(group, reset=decision.changed),
                column_counts=column_counts(decision.col_indices, group.cols)))
        new_topologies = [t for decision in decisions for t in decision.col_indices.unbind(0)]  # in bank order
        differ = check_same_topology(bank.names, new_topologies, self.process_group, step, wait=False)
        bank.end_decision()
        host, extra = fetch(device_records, [] if differ is None else [differ])  # the one host synchronization
        swaps = [Swaps.of(record) for record in host]
        apply_decisions(bank, list(zip(bank.groups, seeds, decisions, swaps)), self.optimizer, config)
        records = {}
        for group, record, group_swaps in zip(bank.groups, host, swaps):
            bank.count_swaps(group, group_swaps.per_layer(len(group.members)))
            names = [bank.names[i] for i in group.members]
            records.update(zip(names, layer_records(record, group_swaps, names, group.rows * group.k, step)))
        raise_if_diverged(bank.names, extra[0] if extra else None, step)
        return records

    # -- records, logging, callbacks -------------------------------------------------------------
    def _warn_nonfinite(self, step: int, name: str) -> None:
        message = (f"sparsify.topology: non-finite scores in {name} at step {step}; the topology decision was skipped "
                   "and the non-finite values were left out of the statistics (warned once; later skips are logged)")
        if not self._warned_nonfinite:
            warnings.warn(message, RuntimeWarning, stacklevel=4)
            self._warned_nonfinite = True
        else:
            logger.warning(message)

    def _publish(self, step: int, records: list[TopologyDecision]) -> None:
        self.history.extend(records)
        if self.config.history_size is not None and len(self.history) > self.config.history_size:
            del self.history[: len(self.history) - self.config.history_size]
        metrics = decision_metrics(records)
        logger.info(
            "step %d: %d swaps in %d layers (%.2f%% of blocks, %d explored), mean age %.1f, column entropy %.3f",
            step, metrics["topology/swaps"], len(records), 100 * metrics["topology/swap_rate"],
            metrics["topology/explored"], metrics["topology/mean_age"], metrics["topology/column_entropy"],
        )
        for fn in self._callbacks:
            fn(step, metrics, records)

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The wrapped optimizer's state dict plus a ``"topology"`` entry (tensors and plain Python:
        loadable with ``torch.load(weights_only=True)``). Decisions draw from a generator seeded by
        ``(config.seed, step)``, so no generator state needs saving. Under FSDP2 with
        ``torch.distributed.checkpoint``, use ``sparsify.topology.fsdp.checkpoint_state`` instead."""
        out = dict(self.optimizer.state_dict())
        out["topology"] = self.topology_state_dict()
        return out

    def topology_state_dict(self) -> dict:
        """This optimizer's own state (the ``"topology"`` entry of :meth:`state_dict`); it may differ
        across ranks (probe statistics are local), so save it per rank."""
        return checkpoint.topology_state(self)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load what :meth:`state_dict` returned, after the model's own state (its ``col_indices``).

        Everything is validated before anything changes (see ``sparsify.topology.checkpoint``): a
        rejected state raises ValueError and leaves the wrapped optimizer and the topology state as
        they were."""
        state_dict = dict(state_dict)
        topology = state_dict.pop("topology", None)
        prepared = None if topology is None else checkpoint.validate(self, topology)
        checkpoint.check_wrapped_state(self, state_dict)
        self.optimizer.load_state_dict(state_dict)  # checks its groups before it changes anything
        if prepared is not None:
            checkpoint.commit(self, prepared)

    def load_topology_state_dict(self, topology: dict) -> None:
        """Restore what :meth:`topology_state_dict` returned (validated first, like :meth:`load_state_dict`)."""
        checkpoint.commit(self, checkpoint.validate(self, topology))


class _Frozen(NamedTuple):
    """A layer whose protected or kept slots are restored or scaled after the wrapped step."""

    values: torch.Tensor
    protected: torch.Tensor  # [R_local, K, 1, 1] bool
    kept: torch.Tensor | None  # [R_local, K, 1, 1] bool, or None when no learning-rate scaling applies
    saved: torch.Tensor  # this rank's values before the step


def _zero_protected_grads(frozen: list[_Frozen]) -> None:
    for f in frozen:
        if f.values.grad is not None:
            fsdp.local(f.values.grad).masked_fill_(f.protected, 0)
