"""One task-A run (shared by the arms that train A alike) and one task-B run per arm, seed and LR.

Protocol (research.md section 5): train A, record acc_A_before; train B, evaluating A's accuracy and
B's held-out loss at fixed checkpoints; forgetting = (before - after) / before at each checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from sparsify import TopologyConfig, TopologyOptimizer, densify, set_kernel_options, sparse_layers
from sparsify.kernels.dispatch import backend_for

from forgetting import arms as A
from forgetting import baselines as B
from forgetting import data
from forgetting.evaluate import answer_scores, heldout_loss
from forgetting.model import ModelConfig, build_model


class DeadlinePassed(RuntimeError):
    """A run stopped at the deadline; ``partial`` holds its curve so far (the loss and the evaluations),
    ``state`` what ``train_phase(resume=...)`` needs to go on from there (see ``phase_state``)."""

    def __init__(self, message: str, partial: dict | None = None, state: dict | None = None) -> None:
        super().__init__(message)
        self.partial = partial or {}
        self.state = state


@dataclass
class ExpConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    batch: int = 64
    a_steps: int = 600
    b_steps: int = 600
    a_lr: float = 2e-3
    b_lrs: tuple[float, float, float] = (1e-4, 3e-4, 1e-3)  # low, base, high
    warmup: int = 50
    a_evals: int = 4  # accuracy checkpoints during A
    b_evals: int = 6  # checkpoints during B (the calibration picks one of them)
    update_every: int = 50
    score_every: int = 10
    n_test: int = 1000
    n_val: int = 500
    loss_windows: int = 64
    stat_batches: int = 32  # mini-batches for the Fisher and the saliency
    ewc_lambdas: tuple[float, ...] = (1e2, 1e3, 1e4, 1e5)
    n_train: int = 200_000
    prose_file: str = str(data.PROSE_FILE)
    device: str = "cpu"
    tf32: bool = False  # CUDA: float32 matmuls (cuBLAS and the Triton kernels alike) on TF32 tensor cores
    backend: str = "auto"  # sparsify's kernel backend: auto, reference or triton

    def set_precision(self) -> None:
        """This process's float32 matmul precision (the sparse kernels follow torch's switch) and kernel backend."""
        torch.backends.cuda.matmul.allow_tf32 = self.tf32
        torch.backends.cudnn.allow_tf32 = self.tf32
        set_kernel_options(backend=self.backend)

    def topology(self, seed: int) -> TopologyConfig:
        return TopologyConfig(update_every=self.update_every, score_every=self.score_every, seed=seed)


_CACHE: dict = {}


def tasks(cfg: ExpConfig):
    """Task A problems and task B byte streams (built once per process)."""
    key = (cfg.n_train, cfg.n_val, cfg.n_test, cfg.prose_file)
    if key not in _CACHE:
        math_task = data.MathTask.generate(n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test)
        _CACHE[key] = (math_task, math_task.stream(seed=0), data.load_prose(Path(cfg.prose_file)))
    return _CACHE[key]


def on_device(stream: torch.Tensor, device) -> torch.Tensor:
    """A byte stream's copy on ``device`` (made once per process): batches are then gathered there,
    with no host-to-device copy, hence no host synchronization, per step."""
    key = (id(stream), str(device))
    if key not in _CACHE or _CACHE[key][0] is not stream:
        _CACHE[key] = (stream, stream.to(device))
    return _CACHE[key][1]


def _checkpoints(steps: int, count: int) -> list[int]:
    return sorted({round(steps * i / count) for i in range(1, count + 1)})


def _loss(model, x: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))


def train_phase(model, opt, stream, cfg: ExpConfig, *, steps, lr, seed, cosine, evaluate, eval_at,
                penalty=None, hooks=None, deadline=None, replay=None, resumable=False, resume=None) -> dict:
    """The training loop: warmup then constant (B) or cosine (A) learning rate; returns the loss curve,
    the evaluations and the wall time. ``replay``: (task-A stream, bool [steps, batch]) puts task-A
    windows in the marked rows of each batch. At the deadline (checked every 50 steps) it raises
    DeadlinePassed, with the state after that step if ``resumable`` (task A: a task-B run is short and
    starts over, so its state is not copied off the device); ``resume``: such a state, loaded into
    ``model`` and ``opt`` (built as for the first call), goes on from its step as if the run had never
    stopped: the learning rate and the batches are functions of the step, the only random draws are
    seeded here."""
    gen = torch.Generator().manual_seed(seed)
    # every step's windows drawn up front (the same numbers as one draw per step), gathered on the device
    starts = data.window_starts(stream, cfg.batch, cfg.model.seq_len, gen, count=steps).to(cfg.device)  # [steps, batch]
    stream = on_device(stream, cfg.device)
    if replay is not None:
        replay_gen = torch.Generator().manual_seed(seed + 500)
        replay_stream, replay_rows = on_device(replay[0], cfg.device), replay[1].to(cfg.device)
        replay_starts = data.window_starts(replay[0], cfg.batch, cfg.model.seq_len, replay_gen, count=steps).to(cfg.device)
    start, eval_seconds = time.time(), 0.0

    def timed_eval(step):
        nonlocal eval_seconds
        began = time.time()
        result = evaluate(step)
        eval_seconds += time.time() - began
        return result

    if resume is None:
        first, losses, evals, past = 1, [], [timed_eval(0)], 0.0
    else:
        first, losses, evals, eval_seconds, past = load_phase_state(model, opt, resume, cfg.device)
    model.train()
    for step in range(first, steps + 1):
        frac = min(1.0, step / cfg.warmup)
        if cosine:
            frac *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr * frac
        x = data.gather_windows(stream, starts[step - 1], cfg.model.seq_len)  # [batch, seq + 1]
        if replay is not None:
            old = data.gather_windows(replay_stream, replay_starts[step - 1], cfg.model.seq_len)
            x = torch.where(replay_rows[step - 1, :, None], old, x)
        loss = _loss(model, x)
        (loss + penalty() if penalty is not None else loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if hooks is not None:
            hooks.before_step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if hooks is not None:
            hooks.after_step()
        losses.append(loss.detach())
        if step in eval_at:
            evals.append(timed_eval(step))
        if deadline is not None and step % 50 == 0 and time.time() > deadline:
            seconds = past + time.time() - start
            state = phase_state(model, opt, step, losses, evals, eval_seconds, seconds) if resumable else None
            raise DeadlinePassed(f"deadline passed at step {step}", _curve(losses, evals, seconds, eval_seconds, first), state)
    return _curve(losses, evals, past + time.time() - start, eval_seconds, first)


def _curve(losses: list[torch.Tensor], evals: list[dict], seconds: float, eval_seconds: float, first: int = 1) -> dict:
    curve = {"loss": [round(v, 4) for v in torch.stack(losses).tolist()] if losses else [], "evals": evals,
             "steps_done": len(losses), "seconds": seconds, "eval_seconds": eval_seconds}
    if first > 1:  # resumed: the seconds are the sum over the calls, this call started after step first - 1
        curve["resumed_after"] = first - 1
    return curve


def phase_state(model, opt, step: int, losses: list[torch.Tensor], evals: list[dict], eval_seconds: float,
                seconds: float) -> dict:
    """The loop's state after ``step``, on the CPU and loadable with ``torch.load(weights_only=True)``:
    the model, the optimizer (a TopologyOptimizer's block statistics, ages and history included), every
    step's loss as computed (not rounded), the evaluations and the random generators' states (no step
    draws from them today; saved so that one that does later still resumes identically)."""
    cuda = next(model.parameters()).is_cuda
    return {"step": step, "model": _to_cpu(model.state_dict()), "optimizer": _to_cpu(opt.state_dict()),
            "loss": torch.stack(losses).cpu(), "evals": evals, "eval_seconds": eval_seconds, "seconds": seconds,
            "rng_cpu": torch.get_rng_state(), "rng_cuda": torch.cuda.get_rng_state_all() if cuda else []}


def load_phase_state(model, opt, state: dict, device) -> tuple[int, list[torch.Tensor], list[dict], float, float]:
    """Load a ``phase_state`` into ``model`` and ``opt`` (the model first: a TopologyOptimizer checks its
    saved ``col_indices`` against the model's); returns (the next step, the losses, the evaluations,
    their seconds, the training seconds so far)."""
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"]:
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    losses = list(state["loss"].to(device).unbind())
    return state["step"] + 1, losses, list(state["evals"]), state["eval_seconds"], state["seconds"]


def _decisions(opt) -> list[dict]:
    """Compact Level 2 records: one per event, with per-layer swap rates and column entropies."""
    events: dict[int, dict] = {}
    for d in getattr(opt, "history", []):
        e = events.setdefault(d.step, {"step": d.step, "swaps": 0, "blocks": 0, "seconds": 0.0, "layers": {}})
        e["swaps"] += d.num_swaps
        e["blocks"] += d.num_blocks
        e["seconds"] += d.seconds
        e["layers"][d.layer] = {"swap_rate": d.swap_rate, "entropy": d.column_entropy, "mean_age": d.mean_age}
    for e in events.values():
        e["swap_rate"] = e["swaps"] / max(1, e["blocks"])
        e["entropy"] = sum(v["entropy"] for v in e["layers"].values()) / max(1, len(e["layers"]))
    return [events[s] for s in sorted(events)]


def _topology(model) -> dict[str, list]:
    return {n: layer.col_indices.tolist() for n, layer in sparse_layers(model)}


def _meta(cfg: ExpConfig) -> dict:
    import transformers
    device = torch.device(cfg.device)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "backend": backend_for(device), "torch": torch.__version__, "transformers": transformers.__version__,
        "config": asdict(cfg),
    }


def run_a(arm: A.Arm, seed: int, cfg: ExpConfig, deadline=None, resume=None) -> tuple[dict, dict]:
    """Train task A for the arms sharing ``arm.a_key``; returns (summary, checkpoint). Cut at the deadline,
    it raises DeadlinePassed whose ``state``, passed back as ``resume``, finishes the same run."""
    key = arm.a_key
    arm = dataclasses.replace(arm, dynamic=arm.dynamic or arm.a_dynamic)
    math_task, math_stream, prose = tasks(cfg)
    model = build_model(cfg.model, arm.density, arm.block_size, seed).to(cfg.device)
    opt = A.make_optimizer(model, arm, cfg.a_lr, cfg.topology(seed))
    val_windows = data.fixed_windows(prose["val"], cfg.loss_windows, cfg.model.seq_len)

    def evaluate(step):
        acc, byte_acc = answer_scores(model, math_task.test, cfg.device)
        return {"step": step, "acc_test": acc, "byte_test": byte_acc}

    try:
        phase = train_phase(model, opt, math_stream, cfg, steps=cfg.a_steps, lr=cfg.a_lr, seed=1000 + seed, cosine=True,
                            evaluate=evaluate, eval_at=set(_checkpoints(cfg.a_steps, cfg.a_evals)), deadline=deadline,
                            resumable=True, resume=resume)
    except DeadlinePassed as cut:  # the curve so far, for the calibration of task A's length
        cut.partial = {"key": key, "seed": seed, **_meta(cfg), "phase": cut.partial, "cut": True}
        cut.state |= {"key": key, "seed": seed, "config": resume_key(cfg)}
        raise
    batches = lambda: ((lambda x=x: _loss(model, x)) for x in _windows(math_stream, cfg, seed))  # noqa: E731
    ckpt = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    ckpt["fisher"] = {k: v.cpu() for k, v in A.fisher_diagonal(model, batches()).items()}  # EWC, dense or sparse
    if isinstance(opt, TopologyOptimizer):  # task A's block statistics, for consolidate() at the start of B
        ckpt["topology"] = _to_cpu(opt.topology_state_dict())
    if arm.density is not None:
        ckpt["saliency"] = {k: v.cpu() for k, v in A.block_saliency(model, batches()).items()}
    summary = {
        "key": key, "seed": seed, **_meta(cfg), "phase": phase, "decisions": _decisions(opt),
        "acc_test": (phase["evals"][-1]["acc_test"] if phase["evals"][-1]["step"] == cfg.a_steps  # at the end of A
                     else answer_scores(model, math_task.test, cfg.device)[0]),
        "acc_val": answer_scores(model, math_task.val, cfg.device)[0],
        "b_val_loss": heldout_loss(model, val_windows, cfg.device),
        "params": sum(p.numel() for p in model.parameters()),
    }
    return summary, ckpt


def resume_key(cfg: ExpConfig) -> dict:
    """What a task-A run's course depends on: the whole config but task B's settings and the corpus's
    path (a resume state saved under another key is not loaded: the run starts over)."""
    return {k: v for k, v in asdict(cfg).items() if k not in ("b_steps", "b_lrs", "b_evals", "ewc_lambdas", "prose_file")}


def _to_cpu(state):
    """A nested state (dicts, lists, tensors, plain values) with every tensor on the CPU."""
    if torch.is_tensor(state):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {k: _to_cpu(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_to_cpu(v) for v in state]
    return state


def _windows(stream, cfg: ExpConfig, seed: int, batch: int = 8):
    gen = torch.Generator().manual_seed(7000 + seed)
    return [data.random_windows(stream, batch, cfg.model.seq_len, gen).to(cfg.device) for _ in range(cfg.stat_batches)]


def run_b(arm: A.Arm, seed: int, lr: float, cfg: ExpConfig, a_summary: dict, ckpt: dict,
          lam: float | None = None, deadline=None) -> dict:
    """Continue the task-A model on task B under ``arm``; returns the run's record."""
    math_task, math_stream, prose = tasks(cfg)
    model = build_model(cfg.model, arm.density, arm.block_size, seed)
    model.load_state_dict(ckpt["model"])
    rank = None
    if arm.densify:
        densify(model)
    if arm.lora_density is not None:
        rank = B.lora_rank(model, B.sparse_trainable(cfg.model, arm.lora_density))
        model = B.add_lora(model, rank)
    model.to(cfg.device)
    topo_a = _topology(model)
    values_a = {n: layer.values.detach().clone() for n, layer in sparse_layers(model)}
    opt = A.make_optimizer(model, arm, lr * arm.lr_scale, cfg.topology(seed + 100))
    if arm.consolidate:
        # task A's statistics on B's own clock, records and settings, then the end of task A
        opt.load_topology_state_dict(ckpt["topology"] | {"global_step": 0, "last_age_step": 0, "history": [],
                                                         "config": asdict(opt.config)})
        opt.consolidate()
    penalty = A.EWCPenalty(model, {k: v.to(cfg.device) for k, v in ckpt["fisher"].items()}, lam) if arm.ewc else None
    masks, hooks = {}, None
    if arm.protect is not None:
        masks = {n: A.top_half(s.to(cfg.device)) for n, s in ckpt["saliency"].items()}
        if arm.protect == "freeze":
            for name, mask in masks.items():
                opt.protect(name, mask)
        else:
            hooks = A.Anchor(opt, masks, arm.anchor_rate)
    val_w = data.fixed_windows(prose["val"], cfg.loss_windows, cfg.model.seq_len).to(cfg.device)
    test_w = data.fixed_windows(prose["test"], cfg.loss_windows, cfg.model.seq_len).to(cfg.device)

    def evaluate(step):
        (acc, byte_acc), (acc_val, byte_val) = (answer_scores(model, p, cfg.device) for p in (math_task.test, math_task.val))
        return {"step": step, "acc_test": acc, "byte_test": byte_acc, "acc_val": acc_val, "byte_val": byte_val,
                "b_val_loss": heldout_loss(model, val_w, cfg.device), "b_test_loss": heldout_loss(model, test_w, cfg.device)}

    replay = (math_stream, B.replay_rows(cfg.b_steps, cfg.batch, arm.replay, seed)) if arm.replay else None
    phase = train_phase(model, opt, prose["train"], cfg, steps=cfg.b_steps, lr=lr * arm.lr_scale, seed=2000 + seed,
                        cosine=False, evaluate=evaluate, eval_at=set(_checkpoints(cfg.b_steps, cfg.b_evals)),
                        penalty=penalty, hooks=hooks, deadline=deadline, replay=replay)
    topo_b = _topology(model)
    frozen_drift = {n: float((layer.values.detach() - values_a[n]).abs()[masks[n]].max())
                    for n, layer in sparse_layers(model) if n in masks}
    return {
        "arm": arm.name, "arm_spec": asdict(arm), "seed": seed, "lr": lr, "ewc_lambda": lam, "lora_rank": rank,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad), **_meta(cfg), "a": a_summary,
        "phase": phase, "decisions": _decisions(opt), "topology_a": topo_a, "topology_b": topo_b,
        "protected_slots": {n: int(m.sum()) for n, m in masks.items()}, "protected_max_drift": frozen_drift,
    }
