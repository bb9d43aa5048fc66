"""The markdown report: setup, tables (tabulate), figures, and the claims table (held / refuted / not measured)."""

from __future__ import annotations

import glob
import json
import math
import os
from collections import defaultdict
from pathlib import Path
from statistics import mean

from tabulate import tabulate

from forgetting import HOME, paired, plots
from forgetting.analysis import (PLATEAU_POINTS, a_plateau, calibrate, forgetting, interpolate, interval, load, overlap,
                                 pm, spikes)
from forgetting.data import SOURCE_NOTE

SWEPT = ("dense", "ewc")


def _arm_rows(runs, index, base_lr, primary="acc_test"):
    by_arm = defaultdict(list)
    for r in runs:
        if r["lr"] == base_lr:
            by_arm[r["arm"]].append(r)
    order = ["dense", "ewc"] + sorted(a for a in by_arm if a not in ("dense", "ewc"))
    rows = []
    for arm in [a for a in order if a in by_arm]:
        group = by_arm[arm]
        rows.append({
            "arm": arm, "seeds": len(group),
            "before": interval([r["phase"]["evals"][0]["acc_test"] for r in group]),
            "primary_before": interval([r["phase"]["evals"][0].get(primary, math.nan) for r in group]),
            "bytes_before": interval([r["phase"]["evals"][0].get("byte_test", math.nan) for r in group]),
            "bytes_after": interval([r["phase"]["evals"][index].get("byte_test", math.nan) for r in group]),
            "after": interval([r["phase"]["evals"][index]["acc_test"] for r in group]),
            "forgetting": interval([forgetting(r, index, primary) for r in group if primary in r["phase"]["evals"][0]]),
            "forgetting_exact": interval([forgetting(r, index) for r in group]),
            "forgetting_bytes": interval([forgetting(r, index, "byte_test") for r in group
                                          if "byte_test" in r["phase"]["evals"][0]]),
            "b_loss": interval([r["phase"]["evals"][index]["b_test_loss"] for r in group]),
            "b_loss_end": interval([r["phase"]["evals"][-1]["b_test_loss"] for r in group]),
            "overlap": interval([mean(v["jaccard"] for v in overlap(r).values()) for r in group if overlap(r)]),
            "spikes": [s for r in group for s in spikes(r, r["config"]["update_every"])],
            # Level 2 decisions by phase: A's are the task-A run's (shared by every arm started from that task-A
            # model: in the paired design all sparse arms share one), B's the arm's own
            "decisions_a": {(r["a"].get("key", r["arm"]), r["seed"]): r["a"]["decisions"] for r in group},
            "swap_a": [d["swap_rate"] for r in group for d in r["a"]["decisions"]],
            "swap_b": [d["swap_rate"] for r in group for d in r["decisions"]],
            "entropy": [d["entropy"] for r in group for d in r["a"]["decisions"] + r["decisions"]],
            "dynamic": any(r["decisions"] for r in group), "runs": group,
        })
    return rows


def _sweep_points(runs, index, split="acc_test"):
    """``{arm: [(lr, b_loss, forgetting, ci)]}`` from every arm with runs at several learning rates."""
    grouped = defaultdict(lambda: defaultdict(list))
    for r in runs:
        grouped[r["arm"]][r["lr"]].append(r)
    out = {}
    for arm, by_lr in grouped.items():
        out[arm] = [(lr, mean(r["phase"]["evals"][index]["b_test_loss"] for r in g),
                     *interval([forgetting(r, index, split) for r in g if split in r["phase"]["evals"][0]]))
                    for lr, g in sorted(by_lr.items())]
    return out


def _differences(points, arm):
    """``[(ref, lr, difference, half-width)]``: the arm's forgetting minus dense's and EWC's at the same B loss
    (reference curves piecewise-linear in B loss, their 95% half-widths interpolated the same way), with
    the half-width of the difference as for independent means, sqrt(h_arm^2 + h_ref^2); None outside a
    reference's B-loss range."""
    out = []
    for ref in SWEPT:
        if arm == ref or len(points.get(ref, [])) < 2:
            continue
        curve, widths = [(p[1], p[2]) for p in points[ref]], [(p[1], p[3]) for p in points[ref]]
        for lr, loss, fgt, width in points.get(arm, []):
            other = interpolate(curve, loss)
            if other is None or math.isnan(fgt - other):
                out.append((ref, lr, None, None))
                continue
            out.append((ref, lr, fgt - other, math.hypot(width, interpolate(widths, loss))))
    return out


def _pts(difference: float, width: float) -> str:
    return f"{100 * difference:+.1f}" + ("" if math.isnan(width) else f" ± {100 * width:.1f}") + " pts"


def _equal_learning(points):
    """One row per arm and learning rate: its forgetting and the difference to dense's and EWC's curves."""
    diffs = {arm: {(ref, lr): (d, w) for ref, lr, d, w in _differences(points, arm)} for arm in points}
    rows = []
    for arm, pts in sorted(points.items()):
        for lr, loss, fgt, width in pts:
            row = [arm, f"{lr:g}", f"{loss:.3f}", pm((fgt, width))]
            for ref in SWEPT:
                d, w = diffs[arm].get((ref, lr), (None, None))
                row.append("-" if d is None else _pts(d, w))
            rows.append(row)
    return rows


def _verdict(points, arm):
    """held when every point of the arm inside the reference curves' B-loss range lies below dense's (and
    EWC's, where its range covers it) by more than the 95% half-width of the difference; refuted when any
    lies on or above; inconclusive when all lie below but not all beyond the intervals; not measured when
    none is in range."""
    diffs = [(ref, lr, d, w) for ref, lr, d, w in _differences(points, arm) if d is not None]
    if not diffs:
        return "not measured", "no point inside the reference curves' B-loss range"
    text = ", ".join(f"{_pts(d, w)} vs {ref} (B lr {lr:g})" for ref, lr, d, w in diffs)
    diffs = [(ref, d, w) for ref, _, d, w in diffs]
    if max(d for _, d, _ in diffs) >= 0:
        return "refuted", text
    if all(d + w < 0 for _, d, w in diffs):  # a nan width (one seed) never shows significance
        return "held", text
    return "inconclusive", text


def _config_of(run: dict, fallback):
    from forgetting.model import ModelConfig
    from forgetting.train import ExpConfig

    saved = dict(run.get("config") or {})
    if not saved:
        return fallback
    saved["model"] = ModelConfig(**saved["model"])
    saved["b_lrs"] = tuple(saved["b_lrs"])
    known = set(ExpConfig.__dataclass_fields__)
    return ExpConfig(**{k: v for k, v in saved.items() if k in known})


def _dense_curve(runs, base_lr, split="acc_val") -> str:
    dense = [r for r in runs if r["arm"] == "dense" and r["lr"] == base_lr]
    if not dense:
        return "n/a"
    evals = dense[0]["phase"]["evals"]
    return ", ".join(f"{e['step']}: {100 * mean(forgetting(r, i, split) for r in dense):.0f}%"
                     for i, e in enumerate(evals) if i)


def _bench():
    """The full bench_training records of the default model of the newest date (not --speed-only nor another
    preset), one per block-size run, as one record: their steps and topology rows together, the first memory
    table; None where there is none."""
    records = [json.loads(Path(f).read_text())
               for f in sorted(glob.glob(str(HOME.parents[1] / "benchmarks" / "results" / "training-*.json")))]
    full = [r for r in records if not r["config"].get("speed_only") and r["config"].get("preset", "default") in ("default", "bench")]
    if not full:
        return None
    newest = [r for r in full if r.get("date") == max(x.get("date", "") for x in full)]
    merged = dict(newest[-1])
    merged["steps"] = [s for r in newest for s in r.get("steps", [])]
    merged["topology"] = [t for r in newest for t in r.get("topology", [])]
    merged["memory"] = next((r["memory"] for r in newest if r.get("memory")), [])
    return merged


def _layer_rows():
    """bench_layer rows of the README's table (benchmarks/make_table.py's newest results) at 2048+ tokens and
    density 0.5: SC-002's evidence; [] where there are none."""
    import importlib.util

    path = HOME.parents[1] / "benchmarks" / "make_table.py"
    if not path.exists():
        return []
    spec = importlib.util.spec_from_file_location("make_table", path)
    make_table = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(make_table)
        files = make_table.newest_results()
    except (SystemExit, ImportError):
        return []
    rows = [r for f in files for r in json.loads(Path(f).read_text())["rows"]]
    return [r for r in rows if r["M"] >= 2048 and abs(r["density"] - 0.5) < 0.02 and r.get("speedup_fwd")]


def opening(report: Path) -> str | None:
    """The hand-written text of an existing report: everything between its title and its 'Device:' line."""
    if not report.exists():
        return None
    head, found, _ = report.read_text().split("\n", 1)[-1].partition("\nDevice: **")
    if not found:
        return None
    return head.strip() or None


def write_report(out: Path, report: Path, figures: Path, cfg, note: str | None = None, metric: str = "exact") -> None:
    """``metric``: what "forgetting" means in the headline numbers, the calibration and the claims:
    "exact" (exact match of answers) or "bytes" (answer-byte accuracy); the other is shown beside it."""
    runs, a_runs = load(out)
    if not runs:
        report.parent.mkdir(parents=True, exist_ok=True)
        text = ["# Forgetting report", "", "No task-B runs found under " + str(out) + "."]
        if a_runs:  # task A only (its calibration, or a grid cut before B): how far A got
            text += ["", f"{len(a_runs)} task-A runs.", "", *_grid_lines(out), _plateau_line(a_runs)]
        report.write_text("\n".join(text) + "\n")
        return
    cfg = _config_of(runs[0], cfg)  # the configuration the runs were made with, not today's defaults
    base_lr = cfg.b_lrs[1]
    primary, secondary = ("byte_test", "acc_test") if metric == "bytes" else ("acc_test", "byte_test")
    names = {"acc_test": "exact match", "byte_test": "answer bytes"}
    index, calibration = calibrate(runs, base_lr, primary.replace("_test", "_val"))
    rows = _arm_rows(runs, index, base_lr, primary)
    points = _sweep_points(runs, index, primary)
    byte_points = _sweep_points(runs, index, secondary)
    first = runs[0]
    fig = {}
    fig["bars"] = plots.forgetting_bars(rows, figures / "forgetting_bars.png")
    slug = {"acc_test": "exact_match", "byte_test": "answer_bytes"}  # file names say which metric they plot
    fig["tradeoff"] = plots.tradeoff(points, figures / f"forgetting_vs_b_loss_{slug[primary]}.png", names[primary])
    fig["tradeoff_bytes"] = plots.tradeoff(
        byte_points, figures / f"forgetting_vs_b_loss_{slug[secondary]}.png", names[secondary]
    )
    fig["curves"] = plots.accuracy_curves(a_runs, runs, base_lr, cfg.a_steps, figures / "accuracy_a_then_b.png")
    fig["topology"] = plots.topology_dynamics(runs, base_lr, cfg.a_steps, figures / "topology_dynamics.png")
    fig["masks"] = plots.masks([r for r in runs if r["lr"] == base_lr], figures / "masks_a_vs_b.png")
    folder = Path(os.path.relpath(figures.resolve(), report.parent.resolve())).as_posix()  # a link from the report
    link = lambda name: f"![{name}]({folder}/{name})"  # noqa: E731

    md = ["# Does dynamic block topology forget less at equal learning?", ""]
    if note:
        md += [note.strip(), ""]
    md += [f"Device: **{first['device']}** (backend `{first['backend']}`), torch {first['torch']}, "
           f"transformers {first['transformers']}. Runs: {len(runs)} task-B runs, {len(a_runs)} task-A runs.", ""]
    md += _grid_lines(out)
    m = cfg.model
    md += ["## Setup", "",
           f"- Model: HF `LlamaForCausalLM` from a config, random init, {m.layers} layers, hidden {m.hidden}, MLP {m.mlp}, "
           f"{m.heads} heads, byte vocabulary (256), sequences of {m.seq_len} bytes, batch {cfg.batch}"
           f"{', float32 weights, matmuls in TF32' if getattr(cfg, 'tf32', False) else ', float32'}. "
           f"Sparse arms rewrite the MLPs (gate, up, down) of layers {m.sparse_layers} with `sparsify(..., components=\"mlp\")`.",
           f"- Task A: arithmetic and algebra as text (`Q: 41+38= A: 79`, two-digit `a-b`, three-digit `417+385=`, "
           f"`a+b+c` of digits, `x+38=79, x=`), "
           f"generated from a seed, split by problem (hash of the question); metric: exact match of greedy answers on "
           f"{cfg.n_test} held-out test problems ({cfg.n_val} more for validation). {cfg.a_steps} steps, AdamW lr {cfg.a_lr:g}, cosine.",
           _plateau_line(a_runs),
           f"- Task B: English prose, {SOURCE_NOTE}; directives, markup, tables and code blocks stripped; split by file; "
           f"metric: held-out loss in nats per byte. {cfg.b_steps} steps, constant lr (base {base_lr:g}; sweep {cfg.b_lrs[0]:g} / {cfg.b_lrs[2]:g}).",
           f"- Forgetting = (acc_A_before - acc_A_after) / acc_A_before on the test problems, where acc is **{names[primary]}** "
           f"in the headline numbers, the calibration and the claims ({names[secondary]} shown beside it). "
           f"Intervals: 95% t-intervals over seeds.",
           f"- Calibration of B's length: {calibration}. All numbers below are taken at that checkpoint unless marked 'end'. "
           f"Dense's forgetting (validation, base lr, mean over seeds) by B step: "
           f"{_dense_curve(runs, base_lr, primary.replace('_test', '_val'))}.",
           f"- Dynamic arms: `TopologyOptimizer(AdamW, model, TopologyConfig(update_every={cfg.update_every}, score_every={cfg.score_every}))`, "
           f"defaults otherwise (prune_fraction 0.1, swap_threshold 1.5, epsilon 0.05, gradient scorer), during A and during B. "
           f"Protected: the half of each row's slots with the highest task-A saliency (sum of (w*g)^2, OBD) frozen during B with "
           f"`TopologyOptimizer.protect`. Anchored (the variant): the same half never pruned and trained at 0.1x the rate.",
           ""]
    ewc_file = out / "ewc_lambda.json"
    if ewc_file.exists():
        choice = json.loads(ewc_file.read_text())
        md += [f"- EWC lambda {choice['lambda']:g}, chosen on seed 0's validation split ({choice['rule']}):", ""]
        md += [tabulate([[k, f"{100 * v['acc_val']:.1f}%", f"{v['b_val_loss']:.3f}"] for k, v in choice["candidates"].items()],
                        headers=["lambda", "A val acc (end of B)", "B val loss"], tablefmt="github"), ""]

    md += ["## Runs per arm", "", "Seeds that finished, per arm and task-B learning rate (a cut-off grid shows here "
           "what it lacks; the tables below use what there is).", "",
           tabulate(_coverage(runs, cfg.b_lrs), headers=["arm"] + [f"B lr {lr:g}" + (" (base)" if lr == base_lr else "")
                                                             for lr in cfg.b_lrs], tablefmt="github"), ""]
    md += ["## Forgetting per arm (base learning rate)", "", link(fig["bars"]), ""]
    table = [[r["arm"], r["seeds"], pm(r["before"]), pm(r["after"]), pm(r["forgetting_exact"]), pm(r["bytes_before"]),
              pm(r["bytes_after"]), pm(r["forgetting_bytes"]), pm(r["b_loss"], 1, 3, ""), pm(r["b_loss_end"], 1, 3, ""),
              pm(r["overlap"], 1, 3, "")] for r in rows]
    md += [tabulate(table, headers=["arm", "seeds", "exact match before", "after", "forgetting (exact)",
                                    "answer bytes before", "after", "forgetting (bytes)", "B loss", "B loss (end)",
                                    "Jaccard A/B"], tablefmt="github"), "",
           "acc: exact match of greedy answers on the test problems. 'answer bytes': the same forgetting measured on "
           "the fraction of answer bytes that greedy decoding gets right given the true prefix (finer, less noisy).", ""]

    md += ["## Forgetting at equal task-B learning", "",
           "Learning less forgets less: each arm at three B learning rates, forgetting against B's held-out loss. "
           "An arm forgets less only where its point lies below dense's (and EWC's) curve at the same B loss "
           "(piecewise-linear between the reference's learning rates; '-' where outside its range). Differences "
           "carry the 95% half-width sqrt(h_arm^2 + h_ref^2) (seeds independent between arms); a claim is held "
           "only where every difference is below zero by more than it.", "",
           link(fig["tradeoff"]), ""]
    md += [tabulate(_equal_learning(points), headers=["arm", "B lr", "B loss", f"forgetting ({names[primary]})",
                                                      "vs dense", "vs EWC"], tablefmt="github"), ""]
    md += [f"The same with forgetting measured on {names[secondary]}:", "",
           link(fig["tradeoff_bytes"]), "",
           tabulate(_equal_learning(byte_points), headers=["arm", "B lr", "B loss", f"forgetting ({names[secondary]})",
                                                           "vs dense", "vs EWC"], tablefmt="github"), ""]

    if paired.applies(runs):
        md += paired.section(runs, a_runs, index, primary, names[primary], base_lr, figures, link)
    md += ["## Accuracy through A then B", "", link(fig["curves"]), ""]
    md += ["## Topology: pathways, swaps, entropy, spikes", "", link(fig["topology"]), ""]
    if fig["masks"]:
        md += [link(fig["masks"]), ""]
    topo = []
    for r in rows:
        ov = defaultdict(list)
        for run in r["runs"]:
            for layer, v in overlap(run).items():
                for key in ("kept", "added", "removed"):
                    ov[key].append(v[key])
        sp = r["spikes"]
        swap = lambda v: f"{100 * mean(v):.2f}%" if v else "-"  # noqa: E731
        topo.append([r["arm"], pm(r["overlap"], 1, 3, ""),
                     f"{mean(ov['kept']):.0f} / {mean(ov['added']):.0f} / {mean(ov['removed']):.0f}" if ov else "-",
                     f"{swap(r['swap_a'])} / {swap(r['swap_b'])}",
                     f"{_in_band(r['swap_a'])} / {_in_band(r['swap_b'])}",
                     f"{min(r['entropy']):.3f}" if r["entropy"] else "-",
                     f"{max(sp):.2f}x / {mean(sp):.2f}x" if sp else "-", sum(s > 2 for s in sp)])
    md += [tabulate(topo, headers=["arm", "Jaccard A/B", "blocks kept / added / removed (per layer)",
                                   "mean swap rate (A / B)", "decisions in 1-10% (A / B)", "min column entropy",
                                   "spike max / mean", "spikes > 2x"], tablefmt="github"), "",
           "Swap rates and decisions by phase: A, the Level 2 decisions of the task-A run the arm's B runs started "
           "from (in the paired design every sparse arm starts from the same dynamic task-A model, so they repeat its "
           "numbers), B, the arm's own ('-': no decisions in B). Spikes: max training loss in the 10 steps after each "
           "Level 2 decision over the mean of the 20 steps before it "
           "(B phase). Arms without decisions are measured at the same steps, as a control for ordinary noise.", ""]
    per_layer = next((r for r in rows if r["arm"] == "dynamic-0.5"), None)
    if per_layer:
        layer_rows = defaultdict(list)
        for run in per_layer["runs"]:
            for layer, v in overlap(run).items():
                layer_rows[layer].append(v["jaccard"])
        md += ["Jaccard of active blocks, end of A vs end of B, per layer (dynamic-0.5, mean over seeds):", "",
               tabulate([[k, f"{mean(v):.3f}"] for k, v in sorted(layer_rows.items())], headers=["layer", "Jaccard"],
                        tablefmt="github"), ""]

    md += ["## Final quality against dense (SC-006)", ""]
    dense = next((r for r in rows if r["arm"] == "dense"), None)
    quality = []
    for r in rows:
        if dense and r["arm"] != "dense":
            da, db = dense["primary_before"][0], dense["b_loss_end"][0]
            quality.append([r["arm"], f"{100 * r['primary_before'][0]:.1f}% vs {100 * da:.1f}%",
                            f"{100 * (r['primary_before'][0] - da) / da:+.1f}%" if da else "n/a",
                            f"{r['b_loss_end'][0]:.3f} vs {db:.3f}", f"{100 * (r['b_loss_end'][0] - db) / db:+.1f}%"])
    md += [tabulate(quality, headers=["arm", f"task A after A ({names[primary]})", "relative", "task B loss (end of B)", "relative"],
                    tablefmt="github"), ""]
    md += _bench_section(_bench())
    if paired.applies(runs):
        grouped = paired.groups(runs)
        paired_diffs = {arm: paired.differences(grouped, arm, index, primary, ("dense", "ewc")) for arm in grouped}
        how = ("'Forgets less at equal B loss': judged on the paired differences (within a seed, at the reference's B "
               "loss in that seed; the section above): held only where every one is below zero by more than its 95% "
               "half-width; refuted where one is at or above zero; inconclusive otherwise.")
    else:
        paired_diffs = None
        how = ("'Forgets less at equal B loss': held only where every point lies below dense's and EWC's curves by more "
               "than the 95% half-width of the difference; refuted where one lies on or above; inconclusive where all "
               "lie below but within the intervals.")
    md += ["## Claims", "", f"Forgetting in the claims is measured on {names[primary]}; '(other measure: ...)' gives the "
           f"verdict on {names[secondary]}. " + how, "",
           tabulate(claims(rows, points, _bench(), byte_points, paired_diffs), headers=["claim", "verdict", "evidence"],
                    tablefmt="github"), ""]
    if paired.applies(runs):
        md += paired.answer(runs, index, primary, names[primary], base_lr)
    grid = out / "grid.json"
    if grid.exists():
        g = json.loads(grid.read_text())
        if g.get("failed") or g.get("skipped") or g.get("cut") or g.get("not_done"):
            md += [f"Not run: failed {g.get('failed')}, skipped for time {g.get('skipped')}, stopped at the deadline "
                   f"{g.get('cut', [])}" + (f", not reached {g['not_done']}" if g.get("not_done") else "") + ".", ""]
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(md))


def _coverage(runs, lrs) -> list[list]:
    seeds = defaultdict(lambda: defaultdict(set))
    for r in runs:
        seeds[r["arm"]][r["lr"]].add(r["seed"])
    order = ["dense", "ewc"] + sorted(a for a in seeds if a not in ("dense", "ewc"))
    return [[arm] + [len(seeds[arm][lr]) or "-" for lr in lrs] for arm in order if arm in seeds]


def _plateau_line(a_runs: list[dict]) -> str:
    """Whether task A reached its plateau: the rise of exact match over the last fifth of its steps."""
    found = a_plateau(a_runs)
    parts = [f"{key} {100 * v['start']:.1f}% -> {100 * v['end']:.1f}% ({100 * v['rise']:+.1f} points; lowest seed at the end "
             f"{100 * v['lowest_end']:.1f}%)" for key, v in found.items()]
    flat = [key for key, v in found.items() if v["rise"] < PLATEAU_POINTS]
    span = next(iter(found.values()), {"from": 0, "to": 0})
    return (f"- Task A's plateau: test exact match over the last fifth of its steps ({span['from']} -> {span['to']}, mean "
            f"over seeds): {'; '.join(parts) or 'no task-A runs'}. At its plateau (a rise under {100 * PLATEAU_POINTS:.0f} "
            f"points): {', '.join(flat) or 'none'}.")


def _took(seconds: dict) -> str:
    """Task-A and task-B run times of one grid (a run copied rather than trained, 0 s, left out)."""
    parts = []
    for kind, runs in (("A", {k: v for k, v in seconds.items() if k.count("__") == 1}),
                       ("B", {k: v for k, v in seconds.items() if k.count("__") > 1})):
        trained = [v for v in runs.values() if v > 0]
        if runs:
            parts.append(f"{len(runs)} task-{kind} runs" + (f" of {min(trained):.0f}-{max(trained):.0f} s" if trained else "")
                         + (f" ({len(runs) - len(trained)} copied, 0 s)" if len(trained) < len(runs) else ""))
    return ", ".join(parts)


def _call_line(info: dict, g: dict) -> str:
    parts = []
    if info:
        parts.append(f"{info.get('workers', '?')} worker processes on {info.get('device') or 'the CPU'}, "
                     f"CUDA MPS {info.get('mps', '?')}, kernel check {info.get('check', '?')}, "
                     f"grid deadline {info.get('grid_seconds', '?')} s of a {info.get('total_seconds', '?')} s call "
                     f"started {info.get('started', '?')}")
    if g:
        took = _took(g.get("seconds", {}))
        wall = f"grid wall time {g['wall_seconds']} s" + (f" ({took})" if took else "") + "; " if "wall_seconds" in g else ""
        parts.append(wall + f"{len(g.get('skipped', []))} runs skipped for time, {len(g.get('cut', []))} stopped at the "
                     f"deadline, {len(g.get('failed', []))} failed")
    return "; ".join(parts)


def _calls(out: Path) -> list[tuple[dict, dict]]:
    """Every call's (run_info, grid) that gpu_run.sh kept for this grid: ``calls/grid-<name>-<stamp>.json`` and
    ``calls/run_info-<stamp>.json``, beside the grid's folder or in it; oldest first."""
    for folder in (out / "calls", out.parent / "calls"):
        grids = sorted(folder.glob(f"grid-{out.name}-*.json"))
        if grids:
            found = []
            for path in grids:
                info = folder / f"run_info-{path.stem.rsplit('-', 1)[-1]}.json"
                found.append((json.loads(info.read_text()) if info.exists() else {}, json.loads(path.read_text())))
            return found
    return []


def _grid_lines(out: Path) -> list[str]:
    """How the grid ran (gpu_run.sh's run_info.json and the grid's grid.json), when they exist; one line a call
    where the calls were kept (a grid over several calls: the last call's files alone describe only it)."""
    calls = _calls(out)
    if len(calls) > 1:
        total = sum(g.get("wall_seconds", 0) for _, g in calls)
        return [f"Grid: {len(calls)} calls, {total:.0f} s of grid wall time in all:", ""] + [
            f"- call {i}: {_call_line(info, g)}." for i, (info, g) in enumerate(calls, 1)] + [""]
    info_file, grid_file = out / "run_info.json", out / "grid.json"
    if not info_file.exists() and not grid_file.exists():
        return []
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    g = json.loads(grid_file.read_text()) if grid_file.exists() else {}
    return ["Grid: " + _call_line(info, g) + ".", ""]


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.2f}%"


def _bench_section(bench) -> list[str]:
    if not bench:
        return []
    c = bench["config"]
    md = ["## Training speed and memory (benchmarks/bench_training.py)", "",
          f"{bench['device']}, torch {bench['torch']}, triton {bench['triton']}, backend `{bench['backend']}`, "
          f"{'torch.compile (per decoder layer)' if bench['compiled'] else 'eager'}, bf16; Llama {c['layers']} layers, "
          f"hidden {c['hidden']}, MLP {c['mlp']}, all MLPs sparse at density {c['density']}, batch {c['batch']} x {c['seq']} "
          f"tokens; median of {c['steps']} steps; {bench['date']}.", ""]
    if bench["steps"]:
        md += [tabulate([[r["label"], f"{r['step_ms']:.1f}", f"{r['tokens_per_s']:,.0f}", f"{r['peak_gib']:.2f}",
                          f"{r['speedup']:.2f}x" if "speedup" in r else "-"] for r in bench["steps"]],
                        headers=["run", "ms / step", "tokens / s", "peak GiB", "vs dense"], tablefmt="github"), ""]
    if bench["topology"]:
        md += ["Topology optimizer cost, as a fraction of the step (the target: < 2% for scoring + Level 2):", "",
               tabulate([[f"B={t['block_size']}", _percent(t['probe_fraction_eager']), f"{100 * t['scoring_fraction']:.2f}%",
                          f"{t['decisions_in_window']} / {t['swaps_in_window']}", f"{1e3 * t['level2_seconds_per_decision']:.1f} ms",
                          f"{100 * t['level2_fraction_measured']:.2f}%", f"{100 * t['overhead_fraction_at_update_every_100']:.2f}%"]
                         for t in bench["topology"]],
                        headers=["block", "stats probe (eager)", "Level 0/1 scoring", "decisions / swaps in window",
                                 "Level 2 per decision", f"Level 2 at update_every={c['update_every']}", "total at update_every=100"],
                        tablefmt="github"), ""]
    if bench["memory"]:
        md += ["MLP weight + AdamW state bytes against density (SC-007):", "",
               tabulate([[m["density"], f"{m['bytes'] / 2**20:.1f}", f"{m['ratio']:.3f}"] for m in bench["memory"]],
                        headers=["density", "MiB", "of dense"], tablefmt="github"), ""]
    return md


def _in(swap_rate: float) -> bool:
    return 0.01 <= swap_rate <= 0.10


def _in_band(swap_rates: list[float]) -> str:
    """How many decisions swapped 1-10% of the blocks: all of them as a percentage, else 'k of n'."""
    if not swap_rates:
        return "-"
    inside = sum(_in(s) for s in swap_rates)
    return "100%" if inside == len(swap_rates) else f"{inside} of {len(swap_rates)}"


def _below(value: tuple[float, float], limit: float) -> str:
    """A threshold claim on a mean over seeds: held where the whole 95% interval lies below ``limit``, refuted
    where it lies at or above, inconclusive where it straddles it; one seed has no interval: said so."""
    m, h = value
    if m != m:
        return "not measured"
    if h != h:
        return f"not measured (1 seed, no interval; its point estimate is {'below' if m < limit else 'not below'})"
    return "held" if m + h < limit else "refuted" if m - h >= limit else "inconclusive (the interval spans the threshold)"


def claims(rows, points, bench, byte_points=None, paired_diffs=None, layer_rows=None) -> list[list[str]]:
    """The claims table. ``paired_diffs``: {arm: paired differences vs dense and EWC} (paired.differences) where
    the grid is paired: the "forgets less" claims are then judged on them, not on independent intervals.
    ``layer_rows``: bench_layer rows for SC-002 (default: the committed results)."""
    arms = {r["arm"]: r for r in rows}
    dense, dyn = arms.get("dense"), arms.get("dynamic-0.5")
    out = []
    sparse = [r for r in rows if paired.is_sparse(r["runs"][0])]
    if sparse:
        best = min(sparse, key=lambda r: r["forgetting"][0])
        out.append(["SC-001 sparse forgets < 30%", _below(dyn["forgetting"], 0.3) if dyn else "not measured",
                    f"dynamic-0.5 {pm(dyn['forgetting']) if dyn else 'n/a'}; best sparse arm {best['arm']} "
                    f"{pm(best['forgetting'])}; dense {pm(dense['forgetting']) if dense else 'n/a'}"])
    layers = _layer_rows() if layer_rows is None else layer_rows
    if layers:
        blocks = sorted({r["B"] for r in layers}, reverse=True)
        shape = lambda r: f"{r['in']}->{r['out']}"  # noqa: E731
        passed = []
        for b in blocks:
            fast = [shape(r) for r in layers if r["B"] == b and r["speedup_fwd"] >= 1.3]
            if fast:
                passed.append(f"B = {b} ({', '.join(fast)})")
        every = all(r["speedup_fwd"] >= 1.3 for r in layers)
        out.append(["SC-002 forward >= 1.3x at density 0.5",
                    "held" if every else ("held only at " + "; ".join(passed) if passed else "refuted"),
                    "bench_layer, 2048+ tokens: " + "; ".join(
                        f"B = {b}: " + ", ".join(f"{shape(r)} {r['speedup_fwd']:.2f}x" for r in layers if r["B"] == b)
                        for b in blocks)])
    else:
        out.append(["SC-002 forward >= 1.3x at density 0.5", "not measured", "no bench_layer result"])
    scored = [s for s in (bench or {}).get("steps", []) if "topology scoring" in s["label"]]
    if scored:
        ok = min(s["speedup"] for s in scored) >= 1.2
        out.append(["SC-003 end-to-end training >= 1.2x", "held" if ok else "refuted",
                    f"{bench['device']}, {'compiled' if bench['compiled'] else 'eager'}, density "
                    f"{bench['config']['density']}, topology optimizer on: "
                    + ", ".join(f"{s['label'].split()[1]}: {s['speedup']:.2f}x" for s in scored)])
    else:
        out.append(["SC-003 end-to-end training >= 1.2x", "not measured", "no benchmarks/results/training-*.json"])
    sp = [s for r in sparse if r["dynamic"] for s in r["spikes"]]
    out.append(["SC-004 no spike > 2x at decisions", ("held" if max(sp) <= 2 else "refuted") if sp else "not measured",
                f"max {max(sp):.2f}x over {len(sp)} decisions" if sp else "no decisions"])
    # every decision once: a task-A run's (shared by the arms started from it) once, each B run's own
    a_decisions = {k: v for r in sparse for k, v in r["decisions_a"].items()}
    phases = {"A": [d for v in a_decisions.values() for d in v],
              "B": [d for r in sparse for run in r["runs"] for d in run["decisions"]]}
    swaps = [d["swap_rate"] for v in phases.values() for d in v]
    ent = [d["entropy"] for v in phases.values() for d in v]
    if swaps:
        inside = sum(_in(s) for s in swaps)
        outside = defaultdict(list)
        for r in sparse:
            for run in r["runs"]:
                outside[r["arm"]] += [d["swap_rate"] for d in run["decisions"] if not _in(d["swap_rate"])]
        for (key, seed), v in a_decisions.items():
            outside[f"task A {key}"] += [d["swap_rate"] for d in v if not _in(d["swap_rate"])]
        where = "; ".join(f"{arm}: {len(v)} at {100 * min(v):.2f}-{100 * max(v):.2f}%" for arm, v in outside.items() if v)
        ok = inside == len(swaps) and min(ent) > 0.5
        out.append(["SC-005 swap rate 1-10%, entropy > 0.5", "held" if ok else "refuted",
                    f"{inside} of {len(swaps)} decisions in 1-10% ({100 * inside / len(swaps):.1f}%; task A "
                    f"{sum(_in(d['swap_rate']) for d in phases['A'])} of {len(phases['A'])}, task B "
                    f"{sum(_in(d['swap_rate']) for d in phases['B'])} of {len(phases['B'])}; mean {100 * mean(swaps):.2f}%)"
                    + (f", outside: {where}" if where else "") + f"; min column entropy {min(ent):.3f}"])
    if dense and sparse:
        worst = []
        for r in sparse:
            da, db = dense["primary_before"][0], dense["b_loss_end"][0]
            worst.append((r["arm"], (da - r["primary_before"][0]) / da if da else math.nan, (r["b_loss_end"][0] - db) / db))
        ok = all(a <= 0.05 and b <= 0.05 for _, a, b in worst)
        out.append(["SC-006 quality within 5% of dense", "held" if ok else "refuted",
                    "; ".join(f"{n}: A {-100 * a:+.1f}%, B loss {100 * b:+.1f}%" for n, a, b in worst)])
    if bench and bench.get("memory"):
        mem = bench["memory"]
        text = ", ".join(f"d={m['density']}: {m['ratio']:.2f}" for m in mem)
        ok = all(abs(m["ratio"] - m["density"]) <= 0.05 for m in mem if m["density"] < 1)
        out.append(["SC-007 weight memory proportional to density", "held" if ok else "refuted",
                    f"sparse-layer weight+optimizer bytes / dense: {text}"])
    else:
        out.append(["SC-007 weight memory proportional to density", "not measured", "no benchmark file"])
    if dense and dyn:
        before = dyn["primary_before"][0]
        out.append(["US1-1 A acc stays above 70% of an 85% start (< 20% relative loss)",
                    _below(dyn["forgetting"], 0.2) + ("" if before >= 0.85 else " (precondition unmet)"),
                    f"dynamic-0.5 starts at {100 * before:.1f}% (spec assumes 85%), loses {pm(dyn['forgetting'])} relative"])
        cut = (dense["forgetting"][0] - dyn["forgetting"][0]) / dense["forgetting"][0] if dense["forgetting"][0] else math.nan
        verdict, evidence = (paired.claim(paired_diffs.get("dynamic-0.5", {})) if paired_diffs is not None
                             else _verdict(points, "dynamic-0.5"))
        out.append(["US1-2 forgetting >= 30% lower than dense (density 0.5)", "held" if cut >= 0.3 else "refuted",
                    f"at base lr: {100 * cut:.0f}% lower; at equal B loss: {verdict} ({evidence})"])
        out.append(["US1-3 pathway overlap < 70%", _below(dyn["overlap"], 0.7),
                    f"Jaccard end of A vs end of B {pm(dyn['overlap'], 1, 3, '')} (dynamic-0.5)"])
    for arm in [r["arm"] for r in sparse] + ["ewc"]:
        if paired_diffs is not None and arm in paired_diffs:
            verdict, evidence = paired.claim(paired_diffs[arm])
            out.append([f"{arm} forgets less than dense/EWC at equal B loss", verdict, evidence])
        elif len(points.get(arm, [])) > 1 or (arm in arms and arm not in ("ewc",)):
            verdict, evidence = _verdict(points, arm)
            if byte_points:
                bverdict, bevidence = _verdict(byte_points, arm)
                verdict, evidence = f"{verdict} (other measure: {bverdict})", f"{evidence}; other measure: {bevidence}"
            out.append([f"{arm} forgets less than dense/EWC at equal B loss", verdict, evidence])
    return out
