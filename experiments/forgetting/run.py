"""Does dynamic block topology forget less at equal learning? Task A (arithmetic) then task B (prose).

    python experiments/forgetting/run.py prepare        # clean the prose corpus once into data/
    python experiments/forgetting/run.py run --device cuda --workers 14 --deadline 300 --tf32
    bash experiments/forgetting/gpu_run.sh              # the whole GPU grid in one call (see its header)
    python experiments/forgetting/run.py report         # markdown + figures from results/default
    python experiments/forgetting/run.py --smoke        # every arm, tiny, CPU, under a minute
    python experiments/forgetting/run.py run --paired --a-only --a-steps 4000 --a-evals 20   # task A's curve

Paths are relative to the current directory; the defaults live in experiments/forgetting/ (data/ and
results/, both git-ignored). Runs write ``OUT/**.json``; a run whose JSON exists is skipped (resumable).
README.md next to this file has the protocol and the results.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# the package is this folder: import it from its parent, and not its modules as top-level names (data, grid, ...)
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from forgetting import HOME, data  # noqa: E402
from forgetting.arms import make_arms, paired_arms  # noqa: E402
from forgetting.grid import backend_matches, plan, run_grid  # noqa: E402
from forgetting.model import ModelConfig  # noqa: E402
from forgetting.report import opening, write_report  # noqa: E402
from forgetting.train import ExpConfig  # noqa: E402

SMOKE = dict(model=ModelConfig(layers=2, hidden=64, mlp=128, heads=2, seq_len=32, sparse_layers="0..1"), batch=8,
             a_steps=30, b_steps=20, a_lr=3e-3, b_lrs=(1e-3, 3e-3, 1e-2), warmup=5, a_evals=2, b_evals=2,
             update_every=8, score_every=2, n_test=30, n_val=10, loss_windows=8, stat_batches=2, ewc_lambdas=(1e2,),
             n_train=5000)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="run", choices=("prepare", "check", "run", "report"),
                   help="check: exit 1 unless the Triton kernels match the reference on this model's layer shapes")
    p.add_argument("--smoke", action="store_true", help="tiny model, every arm, one seed, CPU; then the report")
    p.add_argument("--out", default=None, help="the runs' folder (default results/default, --smoke results/smoke)")
    p.add_argument("--data", default=str(data.PROSE_FILE), help="the prepared prose corpus (prepare writes it)")
    p.add_argument("--report", default=None, help="markdown path (default OUT/report.md)")
    p.add_argument("--figures", default=None, help="figure folder (default OUT/figures)")
    p.add_argument("--metric", choices=("exact", "bytes"), default="exact",
                   help="forgetting in the headline and claims: exact match or answer-byte accuracy")
    p.add_argument("--note", default=None, help="a markdown file whose text opens the report (what ran where)")
    p.add_argument("--keep-note", action="store_true", help="report: keep the opening text of the report file it replaces")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", choices=("auto", "reference", "triton"), default="auto",
                   help="sparse kernels of every run (sparsify.set_kernel_options); check compares them to the reference")
    p.add_argument("--workers", type=int, default=0, help="parallel processes (0: in this process)")
    p.add_argument("--deadline", type=float, default=None, help="seconds from now; later runs are not started")
    p.add_argument("--deadline-at", type=float, default=None, help="the same as a Unix time (wins over --deadline)")
    p.add_argument("--no-report", action="store_true", help="run: leave the report for later (`report`)")
    p.add_argument("--tf32", action="store_true", help="CUDA: float32 matmuls on TF32 tensor cores (all arms)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--no-sweep", action="store_true", help="skip the learning-rate sweeps")
    p.add_argument("--layers", default=ModelConfig.sparse_layers, help="sparse MLP layers, e.g. 1..4")
    p.add_argument("--density", type=float, default=0.5, help="density of the static, protected and variant arms")
    p.add_argument("--densities", type=float, nargs="+", default=[0.25, 0.5, 0.75], help="dynamic arms")
    p.add_argument("--big-block", type=int, default=64, help="block size of the extra dynamic arm (0: none)")
    p.add_argument("--static-shares-a", action="store_true", help="static arm: B from the dynamic arm's A model")
    p.add_argument("--baselines", action="store_true", help="add replay, LoRA, densified and sparse-EWC arms")
    p.add_argument("--paired", action="store_true",
                   help="the paired design: per seed one dense and one sparse task-A model (--density, 16x16 blocks), "
                        "every B arm from one of them, baselines included (--densities, --big-block ignored)")
    p.add_argument("--a-only", action="store_true",
                   help="task-A runs only (calibrating A's length: use --a-evals for the curve; a run cut at the "
                        "deadline leaves its curve so far and its state in OUT/cut/: the next run goes on from there)")
    p.add_argument("--late", nargs="*", default=[], help="arms run after all others (when time allows)")
    p.add_argument("--ewc-lambdas", type=float, nargs="+", default=list(ExpConfig.ewc_lambdas))
    p.add_argument("--n-layers", type=int, default=ModelConfig.layers)
    p.add_argument("--hidden", type=int, default=ModelConfig.hidden)
    p.add_argument("--mlp", type=int, default=ModelConfig.mlp)
    p.add_argument("--heads", type=int, default=0, help="attention heads (0: hidden // 64)")
    p.add_argument("--seq", type=int, default=ModelConfig.seq_len, help="bytes per training sequence")
    p.add_argument("--a-steps", type=int, default=ExpConfig.a_steps)
    p.add_argument("--a-lr", type=float, default=ExpConfig.a_lr)
    p.add_argument("--a-evals", type=int, default=ExpConfig.a_evals, help="task-A accuracy checkpoints during A")
    p.add_argument("--b-evals", type=int, default=ExpConfig.b_evals, help="checkpoints during B (calibration)")
    p.add_argument("--b-steps", type=int, default=ExpConfig.b_steps)
    p.add_argument("--batch", type=int, default=ExpConfig.batch)
    p.add_argument("--b-lrs", type=float, nargs=3, default=list(ExpConfig.b_lrs), metavar=("LOW", "BASE", "HIGH"))
    return p.parse_args(argv)


def config(args) -> ExpConfig:
    if args.smoke:
        return ExpConfig(**SMOKE, device="cpu", backend=args.backend)
    model = ModelConfig(layers=args.n_layers, hidden=args.hidden, mlp=args.mlp, sparse_layers=args.layers,
                        heads=args.heads or max(1, args.hidden // 64), seq_len=args.seq)
    return ExpConfig(model=model, a_steps=args.a_steps, b_steps=args.b_steps, batch=args.batch, a_lr=args.a_lr,
                     a_evals=args.a_evals, b_evals=args.b_evals, b_lrs=tuple(args.b_lrs),
                     ewc_lambdas=tuple(args.ewc_lambdas), device=args.device, tf32=args.tf32, backend=args.backend)


def main(argv=None) -> dict:
    args = parse(argv)
    out = Path(args.out) if args.out else HOME / "results" / ("smoke" if args.smoke else "default")
    prose = Path(args.data)
    if args.smoke and not prose.exists() and not data.RST_SOURCES.exists():
        prose = out / "prose-docstrings.json"  # the stand-in corpus, built once per output folder
        if not prose.exists():
            print("smoke corpus:", data.prepare_docstrings(prose), "bytes per split ->", prose)
    elif args.command == "prepare" or (args.command == "run" and not prose.exists()):
        print("prose corpus:", data.prepare_prose(out=prose), "bytes per split ->", prose)
    if args.command == "prepare":
        return {}
    cfg = config(args)
    cfg.prose_file = str(prose)
    if args.command == "check":
        sys.exit(0 if backend_matches(cfg, (16, args.big_block) if args.big_block else (16,)) else 1)
    if args.paired:
        arms = paired_arms(args.density)
    else:  # the smoke test runs every arm there is
        arms = make_arms(args.density, tuple(args.densities), args.big_block, args.static_shares_a,
                         baselines=args.baselines or args.smoke)
    outcome = {}
    if args.command == "run":
        deadline = args.deadline_at or (time.time() + args.deadline if args.deadline else None)
        jobs = plan(arms, 1 if args.smoke else args.seeds, cfg, sweep=not args.no_sweep, late=tuple(args.late))
        jobs = [j for j in jobs if j.kind == "A"] if args.a_only else jobs
        outcome = run_grid(jobs, cfg, out, args.workers, deadline)
        print(f"grid: {len(outcome['seconds'])} runs done in {outcome['wall_seconds']:.0f} s;",
              ", ".join(f"{len(outcome[k])} {k}" for k in ("failed", "skipped", "cut")))
        print(json.dumps({k: outcome[k] for k in ("failed", "skipped", "cut")}))
        if args.no_report:
            return outcome
    report = Path(args.report) if args.report else out / "report.md"
    figures = Path(args.figures) if args.figures else out / "figures"
    note = Path(args.note).read_text() if args.note else opening(report) if args.keep_note else None
    write_report(out, report, figures, cfg, note, args.metric)
    print("report ->", report)
    return outcome


if __name__ == "__main__":
    main()
