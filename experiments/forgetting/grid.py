"""The grid: which runs, in what order, on how many worker processes, resumable and deadline-aware.

Every run writes one JSON under ``out`` (task-A runs also a ``.pt`` checkpoint); a run whose JSON
exists is skipped, so the grid resumes where it stopped. A task-A run cut at the deadline leaves its
training state in ``out/cut/`` and the next grid goes on from it, bit-identically (``.pt`` files do not
come back from a device call: gpu_run.sh keeps them on the machine's disk). Jobs are started by
priority, so that a grid cut off by its deadline still has the complete base table:

    0  task-A runs, those that most task-B runs wait on first (dense, then the density of the variants)
    1  EWC's lambda search (seed 0, validation split): EWC's other runs wait on its choice
    2  every arm at the base learning rate, every seed
    3  the learning-rate sweeps on seed 0, then 4 on the other seeds, then 5 the protected arm's
    +10 the ``late`` arms (and task-A runs that only they use)

A worker takes the first job whose inputs exist. A job is not started unless it can finish before the
deadline: 1.1 x the longest past run like it (task A or B, dense or sparse; before any finished, the
nearest kind's, scaled by steps; a resumed task-A run by the steps it has left) must fit. The first
wave starts on no estimate. A run still going at the deadline stops at its next 50-step mark ("cut"),
so the workers are free by the deadline.

A seed's task-B runs share its task-A models, so a task-A checkpoint that is gone (a results folder
restored from a device call's tarball) means: task A and every task-B run from it again, unless every
run of that (task-A model, seed) already has its JSON (then nothing needs the checkpoint any more).
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections import defaultdict
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import torch
from tqdm import tqdm

from sparsify import kernel_options
from sparsify.kernels.dispatch import backend_for

from forgetting.arms import Arm
from forgetting.evaluate import EVAL_BATCH
from forgetting.train import DeadlinePassed, ExpConfig, resume_key, run_a, run_b, tasks


@dataclass(frozen=True)
class Job:
    priority: int
    kind: str  # "A" | "B"
    arm: Arm
    seed: int
    lr: float = 0.0
    lam: float | None = None  # EWC lambda; None for an EWC run: the chosen one
    lam_search: bool = False

    def done(self, out: Path) -> bool:
        """Its JSON and its task-A checkpoint exist. A results folder restored without the checkpoints
        (they do not come back from a device call) reruns task A and every B run started from it, so the
        B runs of a seed still share one task-A model (``run_grid`` skips a seed's task-A model whose
        runs are all done)."""
        return self.path(out).exists() and _a_files(out, self.arm, self.seed)[1].exists()

    def path(self, out: Path) -> Path:
        if self.kind == "A":
            return out / "a" / f"{self.arm.a_key}__s{self.seed}.json"
        lam = f"__lam{self.lam:g}" if self.lam is not None else ""
        return out / "runs" / f"{self.arm.name}__s{self.seed}__lr{self.lr:g}{lam}.json"


def plan(arms: dict[str, Arm], seeds: int, cfg: ExpConfig, sweep: bool, late: tuple[str, ...] = ()) -> list[Job]:
    """Every job in the order it is started (see the module's docstring). ``late``: arms whose task-B runs,
    and the task-A runs that only they use, come after everything else."""
    jobs = _plan(arms, seeds, cfg, sweep)
    early_keys = {a.a_key for a in arms.values() if a.name not in late}

    def is_late(job: Job) -> bool:  # a task-A run stands for its key, not for the arm that named it
        return job.arm.a_key not in early_keys if job.kind == "A" else job.arm.name in late

    return sorted(jobs, key=lambda j: j.priority + (10 if is_late(j) else 0))


def _plan(arms: dict[str, Arm], seeds: int, cfg: ExpConfig, sweep: bool) -> list[Job]:
    b_jobs = _plan_b(arms, seeds, cfg, sweep)
    firsts = {}
    for seed in range(seeds):
        for arm in arms.values():
            firsts.setdefault((arm.a_key, seed), Job(0, "A", arm, seed))
    # the task-A runs that most task-B runs wait on start first
    waiting = {key: sum((j.arm.a_key, j.seed) == key for j in b_jobs) for key in firsts}
    keys = list(firsts)
    a_jobs = sorted(firsts.values(), key=lambda j: (-waiting[(j.arm.a_key, j.seed)], keys.index((j.arm.a_key, j.seed))))
    return a_jobs + b_jobs


def _plan_b(arms: dict[str, Arm], seeds: int, cfg: ExpConfig, sweep: bool) -> list[Job]:
    low, base, high = cfg.b_lrs
    jobs = []
    if "ewc" in arms:
        jobs += [Job(1, "B", arms["ewc"], 0, base, lam, lam_search=True) for lam in cfg.ewc_lambdas]
    for seed in range(seeds):
        jobs += [Job(2, "B", arm, seed, base) for arm in arms.values()]
    if sweep:
        # every arm at three B learning rates: forgetting is compared at equal task-B learning, which
        # needs each arm's forgetting-vs-B-loss curve (the frozen-protection arm comes last, priority 5)
        swept = [a for a in arms.values() if a.protect != "freeze"]
        for seed in range(seeds):
            jobs += [Job(3 if seed == 0 else 4, "B", arm, seed, lr) for arm in swept for lr in (low, high)]
        jobs += [Job(5, "B", arm, seed, lr) for seed in range(seeds) for arm in arms.values()
                 if arm.protect == "freeze" for lr in (low, high)]
    return sorted(jobs, key=lambda j: j.priority)


def arms_density(arms: dict[str, Arm]) -> float | None:
    return next((a.density for a in arms.values() if a.protect is not None), None)


def _a_files(out: Path, arm: Arm, seed: int) -> tuple[Path, Path]:
    base = out / "a" / f"{arm.a_key}__s{seed}"
    return Path(f"{base}.json"), Path(f"{base}.pt")


def _resume_files(out: Path, job: Job) -> tuple[Path, Path]:
    """A cut task-A run's curve so far (it comes back from a device call) and its training state (it
    does not: a dense 6 x 256 model's is 76 MB)."""
    base = out / "cut" / job.path(out).stem
    return Path(f"{base}.json"), Path(f"{base}.pt")


def _save(payload, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, f"{path}.tmp")
    Path(f"{path}.tmp").replace(path)


def _write(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(payload))
    tmp.replace(path)


_WARM: list[bool] = []  # set once this process has finished a job (its first one also compiled kernels)


def execute(job: Job, cfg: ExpConfig, out: Path, deadline: float | None) -> tuple[float, bool]:
    """Run one job in this process and write its files; returns its wall time (without building the
    tasks, once per process) and whether an earlier job in this process had already warmed it up."""
    torch.set_num_threads(int(os.environ.get("FORGETTING_THREADS", "1")))
    cfg.set_precision()
    tasks(cfg)
    warm = bool(_WARM)
    seconds = _execute(job, cfg, out, deadline)
    _WARM.append(True)
    return seconds, warm


def _resume_state(job: Job, cfg: ExpConfig, path: Path) -> dict | None:
    """The saved state of this cut task-A run, if there is one saved under this run's settings."""
    if not path.exists():
        return None
    saved = torch.load(path, weights_only=True)
    if saved.get("config") != resume_key(cfg) or (saved.get("key"), saved.get("seed")) != (job.arm.a_key, job.seed):
        tqdm.write(f"{path}: saved under other settings; task A {job.path(Path('.')).name} starts over")
        return None
    return saved


def _execute(job: Job, cfg: ExpConfig, out: Path, deadline: float | None) -> float:
    start = time.time()
    if job.kind == "A":
        curve_path, resume_path = _resume_files(out, job)
        try:
            summary, ckpt = run_a(job.arm, job.seed, cfg, deadline, resume=_resume_state(job, cfg, resume_path))
        except DeadlinePassed as cut:  # its curve so far beside (not among) the finished runs, and its state
            _save(cut.state, resume_path)
            _write(curve_path, cut.partial)
            cut.state = None  # saved; not pickled back to the grid's process
            raise
        json_path, pt_path = _a_files(out, job.arm, job.seed)
        _save(ckpt, pt_path)
        _write(json_path, summary)
        curve_path.unlink(missing_ok=True)
        resume_path.unlink(missing_ok=True)
    else:
        json_path, pt_path = _a_files(out, job.arm, job.seed)
        a_summary = json.loads(json_path.read_text())
        ckpt = torch.load(pt_path, weights_only=True)
        lam = job.lam if job.lam is not None else _chosen_lambda(out) if job.arm.ewc else None
        searched = out / "runs" / f"{job.arm.name}__s{job.seed}__lr{job.lr:g}__lam{lam:g}.json" if job.arm.ewc else None
        if searched is not None and job.lam is None and searched.exists():  # the lambda search already ran it
            record = json.loads(searched.read_text())
            record["lam_search"] = False
            _write(job.path(out), record)
            return time.time() - start
        record = run_b(job.arm, job.seed, job.lr, cfg, a_summary, ckpt, lam, deadline)
        record["lam_search"] = job.lam_search
        _write(job.path(out), record)
    return time.time() - start


def backend_matches(cfg: ExpConfig, block_sizes: tuple[int, ...] = (16,), tolerance: float = 2e-2) -> bool:
    """Forward and backward of one training step of a sparse model per block size: the backend the runs
    use (``cfg.backend``; auto: the device's) against the PyTorch reference (relative error of the output
    and of every gradient)."""
    from forgetting.model import build_model

    cfg.set_precision()
    worst = 0.0
    for block_size in block_sizes:
        results = {}
        for backend in ("reference", cfg.backend):
            with kernel_options(backend=backend):
                model = build_model(cfg.model, 0.5, block_size, seed=0).to(cfg.device)
                x = torch.randint(0, 256, (cfg.batch, cfg.model.seq_len + 1), generator=torch.Generator().manual_seed(0))
                x = x.to(cfg.device)
                logits = model(input_ids=x[:, :-1], use_cache=False).logits
                torch.nn.functional.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1)).backward()
                results[backend] = [logits.detach()] + [p.grad for p in model.parameters() if p.grad is not None]
                used = backend_for(torch.device(cfg.device))
        errors = [float((a - b).norm() / b.norm().clamp_min(1e-12)) for a, b in zip(results[cfg.backend], results["reference"])]
        print(f"B={block_size}: backend {used} vs reference "
              f"(tf32 {'on' if cfg.tf32 else 'off'}): max relative error {max(errors):.2e}")
        worst = max(worst, *errors)
        # the other shapes a run meets (evaluation batches, the Fisher / saliency mini-batches), compiled here
        # once, so the workers find them in Triton's disk cache instead of all compiling them at once
        for rows, grad in ((EVAL_BATCH, False), (8, True), (cfg.loss_windows, False)):
            x = torch.randint(0, 256, (rows, 24 if rows == EVAL_BATCH else cfg.model.seq_len), device=cfg.device)
            with torch.set_grad_enabled(grad):
                logits = model(input_ids=x, use_cache=False).logits
                if grad:
                    logits.float().sum().backward()
    return worst < tolerance


def _chosen_lambda(out: Path) -> float:
    return json.loads((out / "ewc_lambda.json").read_text())["lambda"]


def choose_lambda(out: Path, cfg: ExpConfig, tolerance: float = 0.05) -> dict | None:
    """EWC's lambda on seed 0's validation split: the highest task-A validation accuracy at the end of B
    among the lambdas whose B validation loss is within ``tolerance`` of dense's (equal learning);
    the smallest lambda when none is. Written to ``ewc_lambda.json``."""
    base = cfg.b_lrs[1]
    dense = out / "runs" / f"dense__s0__lr{base:g}.json"
    found = {lam: out / "runs" / f"ewc__s0__lr{base:g}__lam{lam:g}.json" for lam in cfg.ewc_lambdas}
    found = {lam: json.loads(p.read_text())["phase"]["evals"][-1] for lam, p in found.items() if p.exists()}
    if not dense.exists() or not found:
        return None
    limit = json.loads(dense.read_text())["phase"]["evals"][-1]["b_val_loss"] * (1 + tolerance)
    within = [lam for lam, e in found.items() if e["b_val_loss"] <= limit]
    lam = max(within, key=lambda l: found[l]["acc_val"]) if within else min(found)
    choice = {"lambda": lam, "rule": f"max A val accuracy with B val loss <= dense's x {1 + tolerance}",
              "candidates": {f"{l:g}": {"acc_val": e["acc_val"], "b_val_loss": e["b_val_loss"]} for l, e in found.items()},
              "dense_b_val_loss": limit / (1 + tolerance)}
    _write(out / "ewc_lambda.json", choice)
    return choice


def complete_units(jobs: list[Job], out: Path) -> set[tuple[str, int]]:
    """The (task-A key, seed) pairs every one of whose runs in ``jobs`` has its JSON."""
    units = defaultdict(list)
    for job in jobs:
        units[(job.arm.a_key, job.seed)].append(job)
    return {unit for unit, members in units.items() if all(j.path(out).exists() for j in members)}


def run_grid(jobs: list[Job], cfg: ExpConfig, out: Path, workers: int, deadline: float | None) -> dict:
    """Run every job not done yet; ``workers == 0`` runs them in this process (smoke test, CPU).
    Returns (and keeps ``out/grid.json`` up to date with) what failed, what was skipped for time (never
    started), what was cut at the deadline, and every finished job's seconds."""
    complete = complete_units(jobs, out)
    todo = [j for j in jobs if not j.done(out) and (j.arm.a_key, j.seed) not in complete]
    lam_jobs = [j for j in jobs if j.lam_search]
    failed, skipped, cut = [], [], []
    durations = defaultdict(list)  # (kind, dense or sparse) -> seconds of runs in warm processes
    first_runs = defaultdict(list)  # the same for a process's first run (Triton compiles during it)
    seconds: dict[str, float] = {}
    began = time.time()
    bar = tqdm(total=len(todo), desc="runs", unit="run")

    def a_job(job: Job) -> Job | None:
        return next((f for f in jobs if f.kind == "A" and f.arm.a_key == job.arm.a_key and f.seed == job.seed), None)

    def ready(job: Job) -> bool | None:  # None: can never run
        json_path, pt_path = _a_files(out, job.arm, job.seed)
        if job.kind == "B" and not (json_path.exists() and pt_path.exists()):
            return None if a_job(job) in failed + skipped + cut else False
        if job.kind == "B" and job.arm.ewc and job.lam is None and not (out / "ewc_lambda.json").exists():
            pending_search = [j for j in lam_jobs if not j.path(out).exists() and j not in failed + skipped + cut]
            if not pending_search and (out / "runs" / f"dense__s0__lr{cfg.b_lrs[1]:g}.json").exists():
                return choose_lambda(out, cfg) is not None or None
            return False
        return True

    def expected(job: Job) -> float | None:
        """The longest past run like this one: same kind (task A or B) and family (dense or sparse), else
        same kind, else the other kind's scaled by steps; runs in warm processes where there are any
        (every worker is warm after the first wave)."""
        other = "B" if job.kind == "A" else "A"
        steps = {"A": cfg.a_steps, "B": cfg.b_steps}
        left = _steps_left(job, cfg, out) if job.kind == "A" else cfg.b_steps
        for kind in (job.kind, other):
            for families in ((_family(job),), ("dense", "sparse")):
                past = [v for f in families for v in durations[(kind, f)]]
                past = past or [v for f in families for v in first_runs[(kind, f)]]
                if past:
                    return max(past) * left / max(1, steps[kind])
        return None

    def fits(job: Job) -> bool:
        if deadline is None:
            return True
        guess = expected(job)
        return time.time() < deadline and (guess is None or time.time() + 1.1 * guess < deadline)

    def record() -> dict:
        names = lambda js: [j.path(out).name for j in js]  # noqa: E731
        outcome = {"failed": names(failed), "skipped": names(skipped), "cut": names(cut), "seconds": seconds,
                   "wall_seconds": round(time.time() - began, 1), "workers": workers, "not_done": names(todo)}
        _write(out / "grid.json", outcome)
        return outcome

    def drop(job: Job) -> None:  # never started: blocked by a failed task-A run, or no time left
        todo.remove(job)
        blocker = a_job(job) if job.kind == "B" else None
        (failed if blocker is not None and blocker in failed else skipped).append(job)
        bar.update(1)

    pool = _pool(workers, cfg) if workers > 0 else None
    running: dict = {}
    try:
        while todo or running:
            for job in list(todo):
                if pool is not None and len(running) >= workers:
                    break
                readiness = ready(job)
                if readiness is None or not fits(job):
                    drop(job)
                elif readiness:
                    todo.remove(job)
                    if pool is None:
                        running[_Done(job, cfg, out, deadline)] = job
                        break
                    running[pool.submit(execute, job, cfg, out, deadline)] = job
            if not running:
                if todo and not any(ready(j) for j in todo):  # nothing can ever start
                    for job in list(todo):
                        drop(job)
                continue
            done, _ = wait(list(running), return_when=FIRST_COMPLETED) if pool else (list(running), None)
            for future in done:
                job = running.pop(future)
                try:
                    took, warm = future.result()
                    (durations if warm else first_runs)[(job.kind, _family(job))].append(took)
                    seconds[job.path(out).name] = round(took, 1)
                except DeadlinePassed:
                    cut.append(job)
                except Exception as error:  # noqa: BLE001  (a failed run is reported, the grid goes on)
                    failed.append(job)
                    tqdm.write(f"FAILED {job.path(out).name}: {error!r}")
                bar.update(1)
                record()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        bar.close()
    return record()


def _pool(workers: int, cfg: ExpConfig) -> ProcessPoolExecutor:
    """Worker processes; on a machine with several GPUs each worker is pinned to one, round robin, so
    the workers spread over every GPU (a worker's ``cuda`` is then its own GPU)."""
    context = get_context("spawn")
    gpus = torch.cuda.device_count() if cfg.device == "cuda" else 0
    if gpus <= 1:
        return ProcessPoolExecutor(workers, mp_context=context)
    counter = context.Value("i", 0)
    tqdm.write(f"{workers} workers over {gpus} GPUs")
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_pin_gpu, initargs=(counter, gpus))


def _pin_gpu(counter, gpus: int) -> None:
    """Pool initializer: the n-th worker started sees only GPU n mod ``gpus`` (set before CUDA starts)."""
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(gpus)]
    os.environ["CUDA_VISIBLE_DEVICES"] = ids[index % gpus]


def _family(job: Job) -> str:
    return "dense" if job.arm.density is None else "sparse"


def _steps_left(job: Job, cfg: ExpConfig, out: Path) -> int:
    """A task-A run's steps still to train: all of them unless a cut run's state waits to be resumed."""
    curve_path, resume_path = _resume_files(out, job)
    if not (curve_path.exists() and resume_path.exists()):
        return cfg.a_steps
    return max(0, cfg.a_steps - json.loads(curve_path.read_text())["phase"]["steps_done"])


class _Done:
    """A finished in-process job with the interface of a future."""

    def __init__(self, job, cfg, out, deadline):
        try:
            self._value, self._error = execute(job, cfg, out, deadline), None
        except Exception as error:  # noqa: BLE001
            traceback.print_exc()
            self._value, self._error = None, error

    def result(self):
        if self._error is not None:
            raise self._error
        return self._value
