"""TopologyOptimizer: wraps any optimizer and evolves the block topology of a sparsified model.

    opt = TopologyOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-4), model, TopologyConfig(update_every=100))
    loss.backward(); opt.step(); opt.zero_grad()

The CMS schedule, counted in calls to ``step()``:
  Level 0, every step: the wrapped optimizer's step, then per-block score EMAs (from ``values.grad``)
      and candidate statistics (from the layers' stats probes); no host synchronization.
  Level 1, every ``score_every`` steps: candidate scores are recalibrated against block scores, ages advance.
  Level 2, every ``update_every`` steps: statistics are averaged across ranks, ``decide`` picks swaps
      per layer, and this module applies them in place (the one place that mutates the topology).
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
from sparsify.topology.decide import Plan, decide
from sparsify.topology.distributed import check_same_topology, decision_generator, process_group_of, reduce_, unwrap
from sparsify.topology.metrics import TopologyDecision, column_entropy, decision_metrics

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
        layer_scores: ``{layer name: LayerScores}`` (block EMAs, ages, protected slots ...).
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
        self.layer_scores = {name: sc.LayerScores(layer) for name, layer in self.layers.items()}
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
        names = list(self.layers)
        sc.update_every_step([self.layer_scores[n] for n in names], [self.layers[n] for n in names],
                             config.scorer, config.score_ema, config.candidate_ema)
        if step % config.score_every == 0:
            self._level1()
        if step % config.update_every == 0:
            self._level2()

    def _level1(self) -> None:
        sc.advance_ages(list(self.layer_scores.values()), self.global_step - self._last_age_step)
        self._last_age_step = self.global_step
        for name, layer in self.layers.items():
            sc.calibrate(self.layer_scores[name], layer, self.config.scorer)

    def _level2(self) -> None:
        config, step = self.config, self.global_step
        sc.advance_ages(list(self.layer_scores.values()), step - self._last_age_step)
        self._last_age_step = step
        # identical inputs on every rank: one bucketed all-reduce of every statistic a decision reads.
        # Probe statistics are local: averaged. Block EMAs are the same everywhere under DDP (averaged
        # gradients): averaged too; under FSDP2 each rank knows its own rows: the others are zeroed, summed.
        averaged, summed = [], []
        for name, s in self.layer_scores.items():
            averaged.append(s.probe_ema)
            values = self.layers[name].values
            if fsdp.is_sharded(values) and config.scorer == "gradient":
                first, stop = fsdp.row_range(values)
                s.block_ema[:first].zero_()
                s.block_ema[stop:].zero_()
                summed.append(s.block_ema)
            else:
                averaged.append(s.block_ema)
        reduce_(averaged, summed, self.process_group)
        generator = decision_generator(config.seed, step)
        records = []
        for name, layer in self.layers.items():
            start = time.perf_counter()
            s = self.layer_scores[name]
            nonfinite = sc.repair_nonfinite(s)
            if not nonfinite:
                sc.calibrate(s, layer, config.scorer)
                block = sc.block_scores(s, layer, config.scorer)
                plan = decide(block, sc.candidate_scores(s), layer.col_indices, config, generator, s.protected)
                mean_score = float(block.mean())
            else:
                plan, mean_score = None, float("nan")
            if nonfinite or plan.skipped is not None:
                self._warn_nonfinite(step, name)
                records.append(self._record(name, layer, s, None, mean_score, start, skipped="nonfinite"))
                continue
            self._apply(layer, s, plan, generator)
            records.append(self._record(name, layer, s, plan, mean_score, start))
        check_same_topology(list(self.layers), [m.col_indices for m in self.layers.values()], self.process_group, step)
        self._publish(step, records)

    # -- applying a decision: the one place that mutates the topology ----------------------------
    @torch.no_grad()
    def _apply(self, layer: BlockSparseLinear, s: sc.LayerScores, plan: Plan, generator: torch.Generator) -> None:
        if plan.num_swaps == 0:
            return
        values = layer.values
        device, block = values.device, layer.block_size
        rows, slots = plan.rows.to(device), plan.slots.to(device)
        layer.col_indices.copy_(plan.col_indices)
        grown = torch.zeros(plan.num_swaps, block, block)  # [S, B, B], drawn whole on every rank
        if self.config.grow_init == "kaiming":
            bound = 0.1 / math.sqrt(layer.in_features)  # nn.Linear's kaiming_uniform(a=sqrt(5)) bound, x 0.1
            grown.uniform_(-bound, bound, generator=generator)
        # values, gradient, optimizer state: this rank's rows (all rows unless FSDP2 shards them)
        first, stop = fsdp.row_range(values)
        keep, local_rows = fsdp.index_local_rows(plan.rows, first, stop)  # on the CPU, like the plan
        where = (local_rows.to(device), plan.slots[keep].to(device))
        fsdp.local(values.data).index_put_(where, grown[keep].to(device=device, dtype=values.dtype))
        if values.grad is not None:
            fsdp.local(values.grad).index_put_(where, torch.zeros((), device=device, dtype=values.grad.dtype))
        for state in self.optimizer.state.get(values, {}).values():
            if torch.is_tensor(state) and state.shape == values.shape:  # Adam exp_avg / exp_avg_sq, SGD momentum
                fsdp.local(state).index_put_(where, torch.zeros((), device=state.device, dtype=state.dtype))
        # a grown block starts from the calibrated estimate that won it the slot, and age 0
        if self.config.scorer == "gradient":
            s.block_ema.index_put_((rows, slots), plan.grown_scores.to(device))
        s.age.index_put_((rows, slots), torch.zeros((), dtype=s.age.dtype, device=device))
        s.swaps_total += plan.num_swaps

    # -- records, logging, callbacks -------------------------------------------------------------
    def _record(self, name, layer, s, plan: Plan | None, mean_score: float, start: float, skipped=None):
        num_blocks = layer.num_rows * layer.blocks_per_row
        record = TopologyDecision(
            step=self.global_step, layer=name, num_swaps=0, swap_rate=0.0, num_blocks=num_blocks,
            mean_block_score=mean_score, mean_age=float(s.age.double().mean()),
            column_entropy=column_entropy(layer.col_indices, layer.num_cols), skipped=skipped,
        )
        if plan is not None:
            rows, slots = plan.rows.tolist(), plan.slots.tolist()
            record.num_swaps = plan.num_swaps
            record.swap_rate = plan.num_swaps / num_blocks
            record.pruned = list(zip(rows, slots, plan.pruned_cols.tolist()))
            record.grown = list(zip(rows, slots, plan.grown_cols.tolist()))
            record.explored = int(plan.explored.sum())
            record.pruned_scores = plan.pruned_scores.tolist()
            record.grown_scores = plan.grown_scores.tolist()
        record.seconds = time.perf_counter() - start
        return record

    def _warn_nonfinite(self, step: int, name: str) -> None:
        message = (f"sparsify.topology: non-finite scores in {name} at step {step}; the topology decision was skipped "
                   "and the statistics were reset (warned once; later skips are logged)")
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
