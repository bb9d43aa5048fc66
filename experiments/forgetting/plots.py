"""The report's figures (matplotlib, Agg, small PNGs)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from forgetting.analysis import blocks, forgetting, interval  # noqa: E402

DPI = 80


def _save(fig, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path.name


def forgetting_bars(rows: list[dict], path: Path) -> str:
    fig, ax = plt.subplots(figsize=(8, 3.5))
    names = [r["arm"] for r in rows]
    means = [100 * r["forgetting"][0] for r in rows]
    errors = [100 * r["forgetting"][1] if r["forgetting"][1] == r["forgetting"][1] else 0 for r in rows]
    ax.bar(names, means, yerr=errors, capsize=4, color=["#888" if n in ("dense", "ewc") else "#4a7" for n in names])
    ax.set_ylabel("forgetting of task A (%)")
    ax.set_title("forgetting per arm (base B learning rate), mean and 95% interval over seeds")
    ax.tick_params(axis="x", rotation=30)
    return _save(fig, path)


def tradeoff(points: dict[str, list[tuple[float, float, float, float]]], path: Path, measure: str = "exact match") -> str:
    """``points[arm] = [(lr, b_loss, forgetting, forgetting_ci)]``: forgetting against B's held-out loss."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for arm, pts in sorted(points.items()):
        pts = sorted(pts, key=lambda p: p[1])
        xs, ys, es = [p[1] for p in pts], [100 * p[2] for p in pts], [100 * p[3] if p[3] == p[3] else 0 for p in pts]
        style = "-o" if len(pts) > 1 else "s"
        ax.errorbar(xs, ys, yerr=es, fmt=style, capsize=3, label=arm, lw=2 if arm in ("dense", "ewc") else 1.2)
        for lr, x, y in zip([p[0] for p in pts], xs, ys):
            if len(pts) > 1:
                ax.annotate(f"{lr:g}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("task B held-out loss (nats/byte, lower = learned more)")
    ax.set_ylabel(f"forgetting of task A, {measure} (%)")
    ax.set_title("forgetting at equal task-B learning (labels: B learning rate)", fontsize=10)
    ax.invert_xaxis()
    ax.legend(fontsize=7)
    return _save(fig, path)


def _by_arm(runs: list[dict], lr: float) -> list[tuple[str, list[dict]]]:
    """The runs at B learning rate ``lr``, grouped by arm, in arm order."""
    by_arm = defaultdict(list)
    for r in runs:
        if r["lr"] == lr:
            by_arm[r["arm"]].append(r)
    return sorted(by_arm.items())


def accuracy_curves(a_runs: list[dict], runs: list[dict], base_lr: float, a_steps: int, path: Path) -> str:
    fig, ax = plt.subplots(figsize=(8, 4))
    for arm, group in _by_arm(runs, base_lr):
        a_evals = [r["a"]["phase"]["evals"] for r in group]
        b_evals = [r["phase"]["evals"] for r in group]
        xs = [e["step"] for e in a_evals[0]] + [a_steps + e["step"] for e in b_evals[0][1:]]
        ys = [mean(ev[i]["acc_test"] for ev in a_evals) for i in range(len(a_evals[0]))]
        ys += [mean(ev[i]["acc_test"] for ev in b_evals) for i in range(1, len(b_evals[0]))]
        ax.plot(xs, [100 * y for y in ys], label=arm, lw=2 if arm in ("dense", "ewc") else 1)
    ax.axvline(a_steps, color="k", ls=":", lw=1)
    ax.text(a_steps, 1, " task B starts", fontsize=8)
    ax.set_xlabel("step (task A, then task B)")
    ax.set_ylabel("task A exact match (%)")
    ax.set_title("task A accuracy through A then B (mean over seeds)")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def forgetting_by_step(runs: list[dict], base_lr: float, split: str, path: Path, measure: str) -> str:
    """Forgetting of task A at every B checkpoint, per arm (base learning rate, mean over seeds)."""
    fig, ax = plt.subplots(figsize=(8, 4))
    for arm, group in _by_arm(runs, base_lr):
        steps = [e["step"] for e in group[0]["phase"]["evals"]]
        ys = [100 * interval([forgetting(r, i, split) for r in group])[0] for i in range(len(steps))]  # nan: no A left
        ax.plot(steps, ys, label=arm, lw=2 if arm in ("dense", "ewc") else 1)
    ax.set_xlabel("task-B step")
    ax.set_ylabel(f"forgetting of task A, {measure} (%)")
    ax.set_title("forgetting through task B (base B learning rate, mean over seeds)", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def topology_dynamics(runs: list[dict], base_lr: float, a_steps: int, path: Path) -> str:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    by_arm = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r["lr"] != base_lr or not r["decisions"]:
            continue
        for offset, decisions in ((0, r["a"]["decisions"]), (a_steps, r["decisions"])):
            for d in decisions:
                by_arm[r["arm"]][offset + d["step"]].append((d["swap_rate"], d["entropy"]))
    for arm, series in sorted(by_arm.items()):
        steps = sorted(series)
        top.plot(steps, [100 * mean(v[0] for v in series[s]) for s in steps], ".-", label=arm, lw=1)
        bottom.plot(steps, [mean(v[1] for v in series[s]) for s in steps], ".-", label=arm, lw=1)
    top.axhspan(1, 10, color="green", alpha=0.1)
    top.set_ylabel("swap rate (%)")
    top.set_title("Level 2 decisions: swap rate and column entropy (1.0 = even), A then B")
    bottom.axhline(0.5, color="r", ls=":", lw=1)
    bottom.set_ylabel("column entropy")
    bottom.set_xlabel("step")
    for ax in (top, bottom):
        ax.axvline(a_steps, color="k", ls=":", lw=1)
    top.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def masks(runs: list[dict], path: Path) -> str | None:
    """Block masks of one layer at the end of A and the end of B: kept, removed (A only), added (B only)."""
    picked = [r for r in runs if r.get("topology_a") and r["seed"] == 0 and r["lr"] == runs[0]["lr"]]
    order = ["dynamic-0.5", "protected-0.5", "anchored-0.5", "dynamic-0.25", "dynamic-0.75", "dynamic-0.5-b64"]
    picked = sorted((r for r in picked if r["arm"] in order), key=lambda r: order.index(r["arm"]))[:4]
    if not picked:
        return None
    fig, axes = plt.subplots(1, len(picked), figsize=(3.2 * len(picked), 3.4), squeeze=False)
    for ax, r in zip(axes[0], picked):
        layer = sorted(r["topology_a"])[0]
        a, b = blocks(r["topology_a"][layer]), blocks(r["topology_b"][layer])
        rows = len(r["topology_a"][layer])
        cols = 1 + max(c for _, c in a | b)
        img = np.ones((rows, cols, 3))
        for (i, j) in a & b:
            img[i, j] = (0.15, 0.15, 0.15)
        for (i, j) in a - b:
            img[i, j] = (0.9, 0.2, 0.2)
        for (i, j) in b - a:
            img[i, j] = (0.2, 0.7, 0.3)
        ax.imshow(img, interpolation="nearest", aspect="auto")
        ax.set_title(f"{r['arm']}\n{layer.replace('model.layers.', 'L')}", fontsize=8)
        ax.set_xlabel("block-column")
    axes[0][0].set_ylabel("block-row")
    fig.suptitle("end of A vs end of B: dark kept, red removed, green added for B", fontsize=9)
    return _save(fig, path)


def forgetting_ci(runs: list[dict], index: int) -> tuple[float, float]:
    return interval([forgetting(r, index) for r in runs])
