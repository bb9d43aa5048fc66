"""From run records to numbers: forgetting at the calibrated B length, intervals, overlap, spikes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import mean, stdev

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def load(out: Path) -> tuple[list[dict], list[dict]]:
    """(task-B runs, task-A runs), EWC's lambda-search runs left out unless they are the chosen lambda."""
    chosen = out / "ewc_lambda.json"
    lam = json.loads(chosen.read_text())["lambda"] if chosen.exists() else None
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    runs = [r for r in runs if not r.get("lam_search")]
    runs = [r for r in runs if r["arm"] != "ewc" or lam is None or r["ewc_lambda"] == lam]
    a_runs = [json.loads(p.read_text()) for p in sorted((out / "a").glob("*.json"))]
    return runs, a_runs


PLATEAU_POINTS = 0.03  # a rise of less than 3 points of exact match over the last fifth of task A: at its plateau


def a_plateau(a_runs: list[dict], tail: float = 0.2) -> dict[str, dict]:
    """Task A's rise over the last ``tail`` of its steps, per task-A model (``key``): the mean over seeds of
    the test exact match at the evaluation nearest ``(1 - tail) x steps`` and at the last one."""
    curves: dict[str, list[list[dict]]] = {}
    for run in a_runs:
        curves.setdefault(run["key"], []).append(run["phase"]["evals"])
    found = {}
    for key, evals in sorted(curves.items()):
        steps = evals[0][-1]["step"]
        before = [min(e, key=lambda x: abs(x["step"] - (1 - tail) * steps)) for e in evals]
        start, end = mean(b["acc_test"] for b in before), mean(e[-1]["acc_test"] for e in evals)
        found[key] = {"from": before[0]["step"], "to": steps, "start": start, "end": end, "rise": end - start,
                      "lowest_end": min(e[-1]["acc_test"] for e in evals), "seeds": len(evals)}
    return found


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (nan with one value)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    if len(values) == 1:
        return values[0], math.nan
    return mean(values), T975.get(len(values) - 1, 1.96) * stdev(values) / math.sqrt(len(values))


def pm(value: tuple[float, float], scale: float = 100, digits: int = 1, unit: str = "%") -> str:
    """``mean ± half-width`` of an ``interval`` (scaled, with a unit); n/a without values."""
    m, h = value
    if m != m:
        return "n/a"
    return f"{scale * m:.{digits}f}{unit}" + ("" if h != h else f" ± {scale * h:.{digits}f}")


def forgetting(run: dict, index: int, split: str = "acc_test") -> float:
    before, after = run["phase"]["evals"][0][split], run["phase"]["evals"][index][split]
    return (before - after) / before if before > 0 else math.nan


def calibrate(runs: list[dict], base_lr: float, split: str = "acc_val") -> tuple[int, str]:
    """The B checkpoint at which arms are compared: the last one if dense forgets 30-80% of task A
    there (validation split, mean over seeds), else the one where dense forgets closest to 55%."""
    dense = [r for r in runs if r["arm"] == "dense" and r["lr"] == base_lr]
    if not dense:
        return -1, "no dense run: compared at the end of B"
    count = len(dense[0]["phase"]["evals"])
    curve = [mean(forgetting(r, i, split) for r in dense) for i in range(count)]
    steps = [e["step"] for e in dense[0]["phase"]["evals"]]
    if 0.3 <= curve[-1] <= 0.8:
        return count - 1, f"end of B (step {steps[-1]}): dense forgets {curve[-1]:.0%} of task A (validation split)"
    finite = [i for i in range(1, count) if not math.isnan(curve[i])]
    if not finite:
        return count - 1, "end of B (dense's task-A accuracy is 0 before B: forgetting undefined)"
    best = min(finite, key=lambda i: abs(curve[i] - 0.55))
    band = "within" if 0.3 <= curve[best] <= 0.8 else "no checkpoint is in"
    return best, (f"B step {steps[best]} of {steps[-1]}: dense forgets {curve[best]:.0%} there (validation split; "
                  f"{curve[-1]:.0%} at the end), the closest to 55%; {band} the 30-80% band")


def blocks(topology: list[list[int]]) -> set[tuple[int, int]]:
    return {(r, c) for r, row in enumerate(topology) for c in row}


def overlap(run: dict) -> dict[str, dict]:
    """Per layer: Jaccard of active blocks end of A vs end of B, and blocks kept / added / removed."""
    out = {}
    for name, top_a in run.get("topology_a", {}).items():
        a, b = blocks(top_a), blocks(run["topology_b"][name])
        out[name] = {"jaccard": len(a & b) / max(1, len(a | b)), "kept": len(a & b), "added": len(b - a),
                     "removed": len(a - b)}
    return out


def spikes(run: dict, every: int, window: int = 10, history: int = 20) -> list[float]:
    """Max loss in the ``window`` steps after each Level 2 event over the mean of the ``history`` before it.
    Arms without decisions are measured at the same steps (a control for ordinary noise)."""
    loss = run["phase"]["loss"]
    steps = [d["step"] for d in run.get("decisions", [])] or list(range(every, len(loss) + 1, every))
    ratios = []
    for s in steps:
        before, after = loss[max(0, s - history) : s], loss[s : s + window]
        if before and after:
            ratios.append(max(after) / mean(before))
    return ratios


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """Piecewise-linear y(x) through ``points``; None outside their x range."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[0][1] if len(points) == 1 and points[0][0] == x else None
