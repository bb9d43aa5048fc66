"""TopologyOptimizer: wraps any optimizer and evolves the block topology of a sparsified model.

    opt = TopologyOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-4), model, TopologyConfig(update_every=100))
    loss.backward(); opt.step(); opt.zero_grad()

The CMS schedule, counted in calls to ``step()``:
  Level 0, every step: the wrapped optimizer's step, then per-block score EMAs (from ``values.grad``)
      and candidate statistics (from the layers' stats probes): one norm kernel per layer and a few
      kernels over all layers' flat statistics (``scores.ScoreBank``); no host synchronization.
  Level 1, every ``score_every`` steps: candidate scores are recalibrated against block scores, ages
      advance; a few kernels per group of same-shaped layers, no host synchronization.
  Level 2, every ``update_every`` steps: statistics are averaged across ranks, ``decide_layers`` picks
      swaps for each group of same-shaped layers on the device, and this module applies them in place
      (the one place that mutates the topology). The host reads the decision records, the non-finite
      flags and the cross-rank topology check in ONE transfer: one host synchronization per event
      (per device holding evolved layers), however many layers there are.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, fields

import torch
from torch import nn

from sparsify.layer import BlockSparseLinear
from sparsify.topology.config import TopologyConfig
from sparsify.topology import fsdp
from sparsify.topology import scores as sc
from sparsify.topology.apply import apply_swaps
from sparsify.topology.decide import decide_layers, to_host
from sparsify.topology.distributed import (
    check_same_topology, decision_generator, process_group_of, raise_if_diverged, reduce_, unwrap,
)
from sparsify.topology.metrics import TopologyDecision, decision_metrics, entropy_of_counts

logger = logging.getLogger("sparsify.topology")

DecisionCallback = Callable[[int, dict, list], None]


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
        # Optimizer.__init__ is not called: it would copy the param groups; these are the wrapped one's.
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
            sc.enable_probe(layer)
        by_device: dict[torch.device, list] = {}
        for name, layer in self.layers.items():
            by_device.setdefault(layer.values.device, []).append((name, layer))
        self.banks = [sc.ScoreBank(named) for named in by_device.values()]  # one per device, usually one
        scores = {name: s for bank in self.banks for name, s in zip(bank.names, bank.scores)}
        self.layer_scores = {name: scores[name] for name in self.layers}
        self.process_group = process_group_of(model, process_group)
        self.global_step = 0
        self._last_age_step = 0
        self._warned_nonfinite = False
        self.history: list[TopologyDecision] = []
        self._callbacks: list[DecisionCallback] = [on_decision] if on_decision is not None else []

    # -- the wrapped optimizer's objects ---------------------------------------------------------
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value):
        self.optimizer.state = value

    @property
    def defaults(self):
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value):
        self.optimizer.defaults = value

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
        frozen = self._frozen()  # [(values, mask [R_local, K, 1, 1], saved local values)]

        def masked_closure():
            with torch.enable_grad():
                loss = closure()
            _zero_protected_grads(frozen)
            return loss

        _zero_protected_grads(frozen)
        loss = self.optimizer.step(masked_closure if closure is not None else None)
        with torch.no_grad():
            for values, mask, saved in frozen:
                local = fsdp.local(values)
                local.copy_(torch.where(mask, saved, local))
            self._after_step()
        return loss

    def _frozen(self):
        # protected masks are kept on the host side as well so the common case costs no sync
        out = []
        for name, layer in self.layers.items():
            s = self.layer_scores[name]
            if s.has_protected():  # under FSDP2: this rank's rows only
                first, stop = fsdp.row_range(layer.values)
                local = fsdp.local(layer.values.detach())
                out.append((layer.values, s.protected[first:stop, :, None, None], local.clone()))
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
        generator = decision_generator(self.config.seed, step)
        seeds = torch.randint(0, 2**62, (sum(len(bank.groups) for bank in self.banks),), generator=generator).tolist()
        records: dict[str, TopologyDecision] = {}
        for bank in self.banks:
            records.update(self._decide(bank, seeds[: len(bank.groups)], step))
            seeds = seeds[len(bank.groups) :]
        ordered = [records[name] for name in self.layers]
        seconds = (time.perf_counter() - start) / len(ordered)
        for record in ordered:
            record.seconds = seconds
            if record.skipped is not None:
                self._warn_nonfinite(step, record.layer)
        self._publish(step, ordered)

    # -- a decision: the one place that mutates the topology -------------------------------------
    @torch.no_grad()
    def _decide(self, bank: sc.ScoreBank, seeds: list[int], step: int) -> dict[str, TopologyDecision]:
        """Decide and apply for every layer of ``bank``; the host waits for the device once."""
        config = self.config
        bank.collect_nonfinite()
        # identical inputs on every rank: one all-reduce of every statistic a decision reads (and of the
        # non-finite flags). Probe statistics are local: averaged. Block EMAs are the same everywhere under
        # DDP (averaged gradients): averaged too; under FSDP2 each rank knows its own rows: the others are
        # zeroed, then summed.
        sharded = [fsdp.is_sharded(m.values) and config.scorer == "gradient" for m in bank.layers]
        if not any(sharded):
            reduce_([bank.stats], [], self.process_group)
        else:
            averaged, summed = [bank.stats[bank.num_blocks :]], []
            for layer, s, shard in zip(bank.layers, bank.scores, sharded):
                if shard:
                    first, stop = fsdp.row_range(layer.values)
                    s.block_ema[:first].zero_()
                    s.block_ema[stop:].zero_()
                    summed.append(s.block_ema)
                else:
                    averaged.append(s.block_ema)
            reduce_(averaged, summed, self.process_group)
        allowed = bank.flags == 0  # [L]: no non-finite statistic on any rank
        decisions, transfer = [], []
        for group, seed in zip(bank.groups, seeds):
            members = slice(group.first, group.first + len(group.members))
            block = bank.block_scores(group, config.scorer)  # [L, R, K]
            cols = bank.col_indices(group)  # [L, R, K]
            bank.calibrate(group, block, cols)
            d = decide_layers(block, bank.candidate_scores(group), cols, config, seed,
                              group.block_view(bank.protected), allowed[members])
            mean_score = block.mean((1, 2))  # [L], before grown slots take their scores below
            torch._foreach_copy_([bank.layers[i].col_indices for i in group.members], list(d.col_indices.unbind(0)))
            if config.scorer == "gradient":  # a grown block starts from the calibrated estimate that won it the slot
                ema = group.block_view(bank.stats)
                ema.scatter_(2, d.slots, torch.where(d.swap, d.grown_scores, ema.gather(2, d.slots)))
            ages = group.block_view(bank.age)
            ages.masked_fill_(d.changed, 0)
            used = d.col_indices.flatten(1).long()
            counts = torch.zeros(len(group.members), group.cols, dtype=torch.int64, device=bank.device)
            counts.scatter_add_(1, used, torch.ones_like(used))  # [L, C] column use, for the entropy
            decisions.append((group, seed, d))
            transfer += d.records() + [d.taken, mean_score, ages.sum((1, 2)), counts]
        differ = check_same_topology(bank.names, [m.col_indices for m in bank.layers], self.process_group, step,
                                     wait=False)
        bank.reset_nonfinite()
        host = to_host(transfer + ([] if differ is None else [differ]))  # the one host synchronization
        records, swaps = {}, []
        for g, (group, _, _) in enumerate(decisions):
            ints, floats, taken, mean_score, age_sum, counts = host[6 * g : 6 * g + 6]
            which, row, pair = (ints[3] & 1).nonzero(as_tuple=True)  # the swaps, by layer, row, then slot
            records.update(self._records(bank, group, ints[:, which, row, pair], floats[:, which, row, pair], which,
                                         row, taken, mean_score, age_sum, counts, step))
            swaps.append((which, row, ints[0, which, row, pair].long()))
        apply_swaps(bank, decisions, swaps, self.optimizer, self.config.grow_init)
        raise_if_diverged(bank.names, None if differ is None else host[-1], step)
        return records

    def _records(self, bank, group, ints, floats, which, row, taken, mean_score, age_sum, counts, step) -> dict:
        """The group's TopologyDecision records from the host copy of its swaps (``ints [4, S]``: slot,
        pruned column, grown column, flags; ``floats [2, S]``: pruned and grown scores; ``which``, ``row``)."""
        per_layer = torch.bincount(which, minlength=len(group.members)).tolist()
        slots, pruned, grown = ints[:3].tolist()
        explored = ((ints[3] & 2) > 0).tolist()
        pruned_scores, grown_scores = floats.tolist()
        rows = row.tolist()
        entropies = entropy_of_counts(counts)
        num_blocks = group.rows * group.k
        out, offset = {}, 0
        for j, index in enumerate(group.members):
            name, num = bank.names[index], per_layer[j]
            part = slice(offset, offset + num)
            out[name] = TopologyDecision(
                step=step, layer=name, num_swaps=num, swap_rate=num / num_blocks, num_blocks=num_blocks,
                mean_block_score=float(mean_score[j]) if taken[j] else math.nan,
                mean_age=int(age_sum[j]) / num_blocks, column_entropy=entropies[j],
                skipped=None if taken[j] else "nonfinite",
                pruned=list(zip(rows[part], slots[part], pruned[part])),
                grown=list(zip(rows[part], slots[part], grown[part])),
                explored=sum(explored[part]), pruned_scores=pruned_scores[part], grown_scores=grown_scores[part],
            )
            bank.scores[index].swaps_total += num
            offset += num
        return out

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
        return {
            "global_step": self.global_step,
            "last_age_step": self._last_age_step,
            "warned_nonfinite": self._warned_nonfinite,
            "config": asdict(self.config),
            "layers": {name: s.state_dict() for name, s in self.layer_scores.items()},
            "history": [d.to_dict() for d in self.history],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        topology = state_dict.pop("topology", None)
        self.optimizer.load_state_dict(state_dict)
        if topology is not None:
            self.load_topology_state_dict(topology)

    def load_topology_state_dict(self, topology: dict) -> None:
        """Restore what :meth:`topology_state_dict` returned."""
        missing = set(self.layer_scores) - set(topology["layers"])
        if missing:
            raise ValueError(
                f"TopologyOptimizer.load_state_dict: the checkpoint has no topology state for {sorted(missing)[:5]}; "
                "it was saved from a model sparsified differently"
            )
        for name, s in self.layer_scores.items():
            s.load_state_dict(topology["layers"][name], name)
        self.global_step = int(topology["global_step"])
        self._last_age_step = int(topology["last_age_step"])
        self._warned_nonfinite = bool(topology["warned_nonfinite"])
        self.history = [TopologyDecision.from_dict(d) for d in topology["history"]]
        saved = {f.name: topology["config"].get(f.name) for f in fields(TopologyConfig)}
        if saved != asdict(self.config):
            logger.warning("TopologyOptimizer.load_state_dict: the checkpoint was saved with %s; continuing with %s",
                           saved, self.config)


def _zero_protected_grads(frozen) -> None:
    for values, mask, _ in frozen:
        if values.grad is not None:
            fsdp.local(values.grad).masked_fill_(mask, 0)
