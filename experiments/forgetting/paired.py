"""Paired by seed: arms compared within a seed, each difference's 95% interval from the per-seed differences.

Every B run of a seed sees the same task-A data order, the same B windows and, in the paired design
(``arms.paired_arms``), starts from one of the seed's two task-A models (dense or sparse), so seed-to-seed
variation in how well A was learned cancels in a difference taken within the seed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from tabulate import tabulate

from forgetting import plots
from forgetting.analysis import forgetting, interpolate, interval, pm

REFERENCES = ("dense", "ewc", "replay-0.01", "replay-0.1", "lora")  # started from the dense task-A model


def applies(runs: list[dict]) -> bool:
    """Records that name their arm's settings (written since the baselines and the paired design)."""
    return bool(runs) and all("arm_spec" in r for r in runs)


def is_sparse(run: dict) -> bool:
    """Whether a B run trains a block-sparse model (older records: every arm but dense and EWC)."""
    spec = run.get("arm_spec")
    if spec is None:
        return run["arm"] not in ("dense", "ewc")
    return spec["density"] is not None and not spec.get("densify")


def groups(runs: list[dict]) -> dict[str, dict[int, dict[float, dict]]]:
    """``{arm: {seed: {lr: run}}}``."""
    out: dict = defaultdict(lambda: defaultdict(dict))
    for r in runs:
        out[r["arm"]][r["seed"]][r["lr"]] = r
    return out


def _loss(run: dict, index: int) -> float:
    return run["phase"]["evals"][index]["b_test_loss"]


def same_lr(grouped, arm: str, ref: str, lr: float, index: int) -> list[float]:
    """Per seed: the arm's B held-out loss minus the reference's at the same B learning rate (how much less or
    more it learned of B from the same batches)."""
    out = []
    for seed, by_lr in grouped[arm].items():
        run, other = by_lr.get(lr), grouped.get(ref, {}).get(seed, {}).get(lr)
        if run is not None and other is not None:
            out.append(_loss(run, index) - _loss(other, index))
    return out


def model_reference(grouped, key: str) -> str | None:
    """The arm every other arm started from task-A model ``key`` is compared with inside that model: dense for
    the dense task-A model, the static arm (the sparse model, its topology frozen in B) for a sparse one."""
    if key == "dense":
        return "dense" if "dense" in grouped else None
    for arm, seeds in sorted(grouped.items()):
        run = next(iter(next(iter(seeds.values())).values()))
        spec = run.get("arm_spec") or {}
        if arm.startswith("static-") and run["a"].get("key") == key and not spec.get("dynamic"):
            return arm
    return None


def at_equal_loss(grouped, arm: str, ref: str, lr: float, index: int, split: str) -> list[float]:
    """Per seed: the arm's forgetting at B learning rate ``lr`` minus the reference's at the same B held-out
    loss (the reference's points over its learning rates in that seed, piecewise-linear). A seed whose B
    loss lies outside the reference's range in that seed is left out."""
    out = []
    for seed, by_lr in grouped[arm].items():
        run, ref_runs = by_lr.get(lr), grouped.get(ref, {}).get(seed, {})
        if run is None or len(ref_runs) < 2:
            continue
        other = interpolate([(_loss(r, index), forgetting(r, index, split)) for r in ref_runs.values()], _loss(run, index))
        if other is not None and not math.isnan(forgetting(run, index, split) - other):
            out.append(forgetting(run, index, split) - other)
    return out


def differences(grouped, arm: str, index: int, split: str,
                refs=REFERENCES) -> dict[tuple[str, float], tuple[float, float, int]]:
    """``{(reference, lr): (mean difference, 95% half-width, seeds)}`` for every reference with a curve."""
    out = {}
    for ref in refs:
        if ref == arm or ref not in grouped:
            continue
        for lr in sorted({lr for by_lr in grouped[arm].values() for lr in by_lr}):
            diffs = at_equal_loss(grouped, arm, ref, lr, index, split)
            if diffs:
                out[(ref, lr)] = (*interval(diffs), len(diffs))
    return out


def verdict(diffs: dict) -> str:
    """held: every paired difference below zero by more than its half-width; refuted: one at or above zero;
    inconclusive: all below, not all beyond; not measured: none in range."""
    if not diffs:
        return "not measured"
    if max(d for d, _, _ in diffs.values()) >= 0:
        return "refuted"
    if all(d + h < 0 for d, h, _ in diffs.values()):  # a nan half-width (one seed) never shows significance
        return "held"
    return "inconclusive"


def _pts(value: tuple[float, float, int] | None, scale: float = 100) -> str:
    """``difference ± half-width (n=seeds)``: in points (scale 100, forgetting) or as is (scale 1, B loss)."""
    if value is None:
        return "-"
    d, h, n = value
    f = ".1f" if scale == 100 else ".3f"
    return f"{scale * d:+{f}}" + ("" if math.isnan(h) else f" ± {scale * h:{f}}") + f" (n={n})"


def _task_a_rows(a_runs: list[dict]) -> list[list]:
    """Each task-A model against the seed's dense one after A: exact match and answer bytes, paired."""
    by_key: dict = defaultdict(dict)
    for a in a_runs:
        by_key[a["key"]][a["seed"]] = a["phase"]["evals"][-1]
    rows = []
    for key, seeds in sorted(by_key.items(), key=lambda kv: kv[0] != "dense"):
        row = [key, len(seeds)]
        for split in ("acc_test", "byte_test"):
            row.append(pm(interval([e[split] for e in seeds.values()])))
            diffs = [e[split] - by_key["dense"][s][split] for s, e in seeds.items() if s in by_key.get("dense", {})]
            row.append("-" if key == "dense" or not diffs else _pts((*interval(diffs), len(diffs))))
        rows.append(row)
    return rows


def section(runs, a_runs, index: int, split: str, measure: str, base_lr: float, figures: Path, link) -> list[str]:
    """The report's paired section: task A before B, every arm against the references at equal B loss
    (paired), the verdicts, and forgetting through B."""
    grouped = groups(runs)
    refs = [r for r in REFERENCES if r in grouped]
    curve = plots.forgetting_by_step(runs, base_lr, split, figures / "forgetting_vs_b_step.png", measure)
    md = ["## Paired by seed", "",
          "Each seed trains task A once per task-A model (`a` key below); every B arm of that seed starts from one of "
          "them, sees the same B batches, and is compared with each reference arm (started from the dense task-A "
          "model) in the same seed: the arm's forgetting minus the reference's at the same B held-out loss (the "
          "reference's curve over its learning rates in that seed). Mean of the per-seed differences and the 95% "
          "t-interval of that mean; n = seeds whose B loss lies inside the reference's range. Replay-R: a fraction R "
          "of B's training sequences are task-A windows. LoRA: peft adapters on every linear layer, the output head included, "
          "frozen base, rank matched to the sparse arms' trainable block values, learning rate 10x the grid's. "
          "finetune: the sparse task-A model densified, then trained dense. ewc-D: EWC on the sparse task-A model, "
          "topology frozen, with dense EWC's lambda. consolidated-D: `TopologyOptimizer.consolidate()` on the block "
          "statistics of the sparse task-A run before B (TopologyConfig's consolidate_keep, consolidate_lr_scale and "
          "consolidate_release at their defaults), then dynamic B.", "",
          "Task A after A (before B), each task-A model against the dense one of the same seed:", "",
          tabulate(_task_a_rows(a_runs), headers=["task-A model", "seeds", "exact match", "vs dense (pts)",
                                                  "answer bytes", "vs dense (pts)"], tablefmt="github"), ""]
    rows, verdicts = [], []
    for arm in sorted(grouped, key=lambda a: (a not in REFERENCES, a)):
        diffs = differences(grouped, arm, index, split)
        for lr in sorted({lr for by_lr in grouped[arm].values() for lr in by_lr}):
            at_lr = [by_lr[lr] for by_lr in grouped[arm].values() if lr in by_lr]
            rows.append([arm, at_lr[0]["a"]["key"], f"{lr:g}", len(at_lr), at_lr[0].get("trainable", "-"),
                         f"{interval([_loss(r, index) for r in at_lr])[0]:.3f}",
                         pm(interval([forgetting(r, index, split) for r in at_lr]))]
                        + [_pts(diffs.get((ref, lr))) for ref in refs])
        if arm not in REFERENCES:
            verdicts.append([arm, verdict(diffs)] + [verdict({k: v for k, v in diffs.items() if k[0] == ref}) for ref in refs])
    md += [f"Forgetting ({measure}) at equal B loss, paired differences in points (arm minus reference):", "",
           tabulate(rows, headers=["arm", "a", "B lr", "seeds", "trainable in B", "B loss", "forgetting"]
                    + [f"vs {ref}" for ref in refs], tablefmt="github"), ""]
    for ref in refs:  # a reference no arm could be compared with: say why its column is empty
        if not any(k[0] == ref for arm in grouped for k in differences(grouped, arm, index, split, (ref,))):
            losses = [_loss(r, index) for by_lr in grouped[ref].values() for r in by_lr.values()]
            md += [f"vs {ref}: no arm in any seed has its B loss inside {ref}'s range in that seed ({ref}'s B loss here "
                   f"{min(losses):.2f}-{max(losses):.2f} over seeds and learning rates): not measured, not a result.", ""]
    md += _within_models(grouped, index, split, measure)
    held = [v[0] for v in verdicts if v[1] == "held"]
    md += ["Does an arm forget less than every reference at equal B learning (held only beyond every paired interval)?", "",
           tabulate(verdicts, headers=["arm", "vs all references"] + [f"vs {ref}" for ref in refs], tablefmt="github"), "",
           ("Held for: " + ", ".join(held) + "." if held else "No arm forgets less than every reference beyond the paired intervals."), "",
           f"Forgetting ({measure}) through B at the base learning rate, mean over seeds:", "", link(curve), ""]
    return md


def _within_models(grouped, index: int, split: str, measure: str) -> list[str]:
    """Each arm against the reference of its own task-A model (dense, or the static sparse arm), seed by seed:
    what B learned at the same learning rate, and forgetting at equal B loss. Both sides start from the same
    task-A model, so the spread of task A between seeds cancels (it does not between the two task-A models)."""
    rows = []
    for arm in sorted(grouped, key=lambda a: (a not in REFERENCES, a)):
        key = next(iter(next(iter(grouped[arm].values())).values()))["a"].get("key")
        ref = model_reference(grouped, key)
        if ref is None or ref == arm:
            continue
        diffs = differences(grouped, arm, index, split, (ref,))
        for lr in sorted({lr for by_lr in grouped[arm].values() for lr in by_lr}):
            loss = same_lr(grouped, arm, ref, lr, index)
            rows.append([arm, key, ref, f"{lr:g}",
                         "-" if not loss else _pts((*interval(loss), len(loss)), scale=1),
                         _pts(diffs.get((ref, lr)))])
    if not rows:
        return []
    return [f"Inside each task-A model: each arm minus the reference started from the same task-A model in the same "
            f"seed (dense for the dense model, the static sparse arm for the sparse one): B held-out loss at the same "
            f"learning rate (nats per byte; below zero: learned more of B) and forgetting ({measure}) at equal B loss "
            f"(points; below zero: forgets less). Here the task-A model's seed-to-seed spread cancels.", "",
            tabulate(rows, headers=["arm", "a", "reference", "B lr", "B loss vs reference (same lr)",
                                    "forgetting vs reference (equal B loss)"], tablefmt="github"), ""]


TOPOLOGY_ARMS = ("consolidated-0.5", "dynamic-0.5")  # TopologyOptimizer.consolidate() at the task boundary; today's


def claim(diffs: dict) -> tuple[str, str]:
    """(verdict, evidence) of "forgets less than dense/EWC at equal B loss" from paired differences
    ``{(reference, lr): (difference, half-width, seeds)}`` (``differences(..., refs=("dense", "ewc"))``)."""
    if not diffs:
        return "not measured", "no seed's point inside the references' B-loss range in that seed"
    return verdict(diffs), ", ".join(f"{_pts(v)} pts vs {ref} (B lr {lr:g}, paired)" for (ref, lr), v in sorted(diffs.items()))


def answer(runs: list[dict], index: int, split: str, measure: str, base_lr: float) -> list[str]:
    """The plain-words answer to the study's question, from the paired differences: does the topology method
    forget less than dense, EWC, replay and LoRA at equal task-B learning, and by how much."""
    grouped = groups(runs)
    refs = [r for r in REFERENCES if r in grouped]
    md = ["## The answer in plain words", ""]
    for arm in (a for a in TOPOLOGY_ARMS if a in grouped):
        diffs = differences(grouped, arm, index, split, refs)
        seeds = len(grouped[arm])
        per_ref = {ref: {k: v for k, v in diffs.items() if k[0] == ref} for ref in refs}
        held = [ref for ref in refs if verdict(per_ref[ref]) == "held"]
        more = [ref for ref in refs if verdict(per_ref[ref]) == "refuted"]
        unmeasured = [ref for ref in refs if verdict(per_ref[ref]) == "not measured"]
        if refs and len(held) == len(refs):
            head = "Yes, beyond every paired interval"
        elif more:
            head = f"No: at some B learning rate it forgets as much as or more than {', '.join(more)}"
        else:
            head = "Not shown: where it forgets less on average, the paired intervals include no difference"
        name = "`TopologyOptimizer.consolidate()` then dynamic B" if arm.startswith("consolidated") else "dynamic topology (today's TopologyOptimizer)"
        md += [f"**Does {arm} ({name}) forget less than {', '.join(refs)} at equal task-B learning?** {head} "
               f"({seeds} seeds, forgetting of A's {measure}, arm minus reference within a seed at the reference's B loss):", ""]
        for ref in refs:
            if not per_ref[ref]:
                md.append(f"- vs {ref}: not measured (no seed's B loss inside {ref}'s range in that seed)")
                continue
            base = per_ref[ref].get((ref, base_lr))
            by_how_much = (f"{_pts(base)} points at the base B rate {base_lr:g}" if base else "no point at the base rate")
            others = ", ".join(f"{_pts(v)} at {lr:g}" for (_, lr), v in sorted(per_ref[ref].items()) if lr != base_lr)
            md.append(f"- vs {ref}: {by_how_much}" + (f" ({others})" if others else "")
                      + f": {verdict(per_ref[ref])}")
        if unmeasured:
            md.append(f"- against {', '.join(unmeasured)} the question has no answer here, not a negative one")
        md.append("")
    return md
