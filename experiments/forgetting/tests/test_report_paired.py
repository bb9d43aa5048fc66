"""The report on paired-grid records as the GPU writes them (built by hand, no training): every Level 2 decision
counted once, threshold claims judged on their intervals (and not at all on one seed), a grid of several calls
described call by call, task A's plateau from a folder of task-A runs only, the comparison inside a task-A model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SPEC = {"density": 0.5, "dynamic": False, "densify": False}


def _decisions(rates: list[float], every: int = 50) -> list[dict]:
    return [{"step": every * (i + 1), "swap_rate": r, "entropy": 0.9} for i, r in enumerate(rates)]


def _run(arm: str, seed: int, lr: float, *, before: float, after: float, b_loss: float, a_key: str,
         a_decisions=(), b_decisions=(), dynamic: bool = False) -> dict:
    spec = {"name": arm, **SPEC, "dynamic": dynamic} if a_key != "dense" else {"name": arm, "density": None}
    evals = [{"step": 0, "acc_test": before, "byte_test": before, "acc_val": before, "b_test_loss": 9.0},
             {"step": 10, "acc_test": after, "byte_test": after, "acc_val": after, "b_test_loss": b_loss}]
    return {"arm": arm, "arm_spec": spec, "seed": seed, "lr": lr, "config": {"update_every": 50},
            "a": {"key": a_key, "decisions": _decisions(list(a_decisions))},
            "phase": {"evals": evals, "loss": [1.0] * 100}, "decisions": _decisions(list(b_decisions))}


def _grid(spread=(0.0, 0.2, 0.4)) -> list[dict]:
    """3 seeds; the two task-A models differ from seed to seed; inside the sparse one, dynamic forgets 5 points
    more than static in every seed at the same B loss; only dynamic decides in B, one decision at 0.5%."""
    runs = []
    for seed, s in enumerate(spread):
        for lr, loss in ((1e-4, 4.0), (3e-4, 3.0)):
            forgot = 0.3 + s + 0.1 * (4.0 - loss)
            runs.append(_run("dense", seed, lr, before=0.8, after=0.8 * (1 - forgot), b_loss=loss, a_key="dense"))
            fs = 0.5 - s + 0.1 * (4.0 - loss)
            runs.append(_run("static-0.5", seed, lr, before=0.9, after=0.9 * (1 - fs), b_loss=loss, a_key="dynamic-0.5",
                             a_decisions=[0.04] * 4))
            runs.append(_run("dynamic-0.5", seed, lr, before=0.9, after=0.9 * (1 - fs - 0.05), b_loss=loss,
                             a_key="dynamic-0.5", a_decisions=[0.04] * 4, b_decisions=[0.005, 0.03], dynamic=True))
    return runs


def test_each_decision_is_counted_once_and_a_miss_is_said_not_rounded_away():
    from forgetting.report import _arm_rows, claims

    rows = _arm_rows(_grid(), 1, 1e-4)
    sc005 = next(c for c in claims(rows, {}, None) if c[0].startswith("SC-005"))
    # 3 seeds x 4 task-A decisions (shared by static and dynamic: once) + 3 seeds x 2 dynamic B decisions
    assert sc005[1] == "refuted"
    assert "15 of 18 decisions" in sc005[2] and "task A 12 of 12" in sc005[2] and "task B 3 of 6" in sc005[2]
    assert "dynamic-0.5: 3 at 0.50-0.50%" in sc005[2]
    static = next(r for r in rows if r["arm"] == "static-0.5")
    assert static["swap_a"] and not static["swap_b"]  # static makes no decisions in B: its B column says '-'


def test_threshold_claims_use_the_interval_and_do_not_judge_one_seed():
    from forgetting.report import _arm_rows, _below, claims

    assert _below((0.10, 0.05), 0.3) == "held" and _below((0.50, 0.05), 0.3) == "refuted"
    assert _below((0.40, 0.20), 0.3).startswith("inconclusive")
    one = claims(_arm_rows([r for r in _grid() if r["seed"] == 0], 1, 1e-4), {}, None)
    sc001 = next(c for c in one if c[0].startswith("SC-001"))
    assert "1 seed" in sc001[1] and "held" not in sc001[1] and "refuted" not in sc001[1]


def test_within_the_sparse_task_a_model_the_seed_spread_cancels():
    from forgetting import paired

    grouped = paired.groups(_grid())
    assert paired.model_reference(grouped, "dynamic-0.5") == "static-0.5"
    assert paired.model_reference(grouped, "dense") == "dense"
    diffs = paired.at_equal_loss(grouped, "dynamic-0.5", "static-0.5", 1e-4, 1, "acc_test")
    assert diffs == pytest.approx([0.05] * 3)
    assert paired.same_lr(grouped, "dynamic-0.5", "static-0.5", 1e-4, 1) == pytest.approx([0.0] * 3)
    md = "\n".join(paired._within_models(grouped, 1, "acc_test", "exact match"))
    assert "| dynamic-0.5 | dynamic-0.5 | static-0.5 | 0.0001 |" in md.replace("  ", " ").replace("  ", " ")
    assert "+5.0 ± 0.0 (n=3)" in md


def test_a_reference_no_arm_reaches_is_said_not_measured(tmp_path):
    from forgetting import paired

    runs = _grid()
    for seed in range(3):  # a LoRA-like reference that never gets near the others' B loss
        for lr, loss in ((1e-4, 6.0), (3e-4, 5.5)):
            runs.append(_run("lora", seed, lr, before=0.8, after=0.0, b_loss=loss, a_key="dense"))
    md = "\n".join(paired.section(runs, [], 1, "acc_test", "exact match", 1e-4, tmp_path, lambda name: name))
    assert "vs lora: no arm in any seed has its B loss inside lora's range" in md
    assert "vs dense: no arm" not in md


def test_a_grid_of_two_calls_is_described_call_by_call(tmp_path):
    from forgetting.report import _grid_lines

    out, calls = tmp_path / "gpu" / "paired", tmp_path / "gpu" / "calls"
    out.mkdir(parents=True), calls.mkdir()
    info = {"workers": 14, "device": "NVIDIA H200", "mps": "on", "check": "passed", "total_seconds": 560, "grid_seconds": 462}
    first = {"seconds": {"dense__s0.json": 166.0, "dynamic-0.5__s0.json": 212.5, "ewc__s0__lr0.0001.json": 0.0,
                         "dense__s0__lr0.0001.json": 30.0}, "wall_seconds": 413.9, "skipped": ["x"], "failed": [], "cut": []}
    last = {"seconds": {"dense__s0__lr3e-05.json": 36.1}, "wall_seconds": 145.3, "skipped": [], "failed": [], "cut": []}
    for stamp, g in (("20261202T061317Z", first), ("20261202T062139Z", last)):
        (calls / f"run_info-{stamp}.json").write_text(json.dumps({**info, "started": stamp}))
        (calls / f"grid-paired-{stamp}.json").write_text(json.dumps(g))
    (out / "grid.json").write_text(json.dumps(last))  # what a call leaves: only the last call's record
    text = "\n".join(_grid_lines(out))
    assert "2 calls" in text and "started 20261202T061317Z" in text and "started 20261202T062139Z" in text
    assert "2 task-A runs of 166-212 s" in text and "2 task-B runs of 30-30 s (1 copied, 0 s)" in text
    assert "1 runs skipped for time" in text


def test_a_folder_of_task_a_runs_only_reports_the_plateau(tmp_path):
    from forgetting.report import write_report
    from forgetting.train import ExpConfig

    (tmp_path / "a").mkdir()
    for seed, end in enumerate((0.80, 0.90)):
        evals = [{"step": s, "acc_test": a} for s, a in ((0, 0.0), (3200, end - 0.1), (4000, end))]
        (tmp_path / "a" / f"dense__s{seed}.json").write_text(json.dumps({"key": "dense", "seed": seed, "phase": {"evals": evals}}))
    write_report(tmp_path, tmp_path / "r.md", tmp_path / "fig", ExpConfig())
    text = (tmp_path / "r.md").read_text()
    assert "Task A's plateau" in text and "dense 75.0% -> 85.0% (+10.0 points" in text and "plateau (a rise under 3 points): none" in text


def test_the_forgets_less_claims_of_a_paired_grid_are_judged_on_the_paired_differences():
    from forgetting import paired
    from forgetting.report import _arm_rows, claims

    runs = _grid()
    grouped = paired.groups(runs)
    diffs = {arm: paired.differences(grouped, arm, 1, "acc_test", ("dense", "ewc")) for arm in grouped}
    # dynamic minus dense within a seed: 0.25 - 2 x spread = +25, -15, -55 points: below zero on average, not beyond
    assert diffs["dynamic-0.5"][("dense", 1e-4)][0] == pytest.approx(-0.15)
    table = claims(_arm_rows(runs, 1, 1e-4), {}, None, paired_diffs=diffs, layer_rows=[])
    row = next(c for c in table if c[0].startswith("dynamic-0.5 forgets less"))
    assert row[1] == "inconclusive" and "-15.0 ±" in row[2] and "paired" in row[2]
    us12 = next(c for c in table if c[0].startswith("US1-2"))
    assert "inconclusive" in us12[2] and "paired" in us12[2]


def test_the_plain_words_answer_follows_the_paired_verdicts():
    from forgetting import paired

    def answer(spread):
        return "\n".join(paired.answer(_grid(spread), 1, "acc_test", "exact match", 1e-4))

    # +25 points more than dense in every seed: no
    text = answer((0.0, 0.0, 0.0))
    assert "forget less than dense at equal task-B learning?** No" in text
    assert "vs dense: +25.0 ± 0.0 (n=3) points at the base B rate 0.0001" in text and text.count(": refuted") == 1
    # 35-39 points less than dense in every seed, a narrow interval: yes
    text = answer((0.30, 0.31, 0.32))
    assert "**Does dynamic-0.5" in text and "?** Yes, beyond every paired interval" in text and ": held" in text
    # below on average, inside the interval: not shown
    assert "?** Not shown" in answer((0.0, 0.2, 0.4))


def test_sc002_is_held_only_where_every_shape_of_a_block_size_is_fast_enough():
    from forgetting.report import claims

    layers = [{"in": 4096, "out": 14336, "B": 128, "speedup_fwd": 1.8}, {"in": 14336, "out": 4096, "B": 128, "speedup_fwd": 1.7},
              {"in": 4096, "out": 14336, "B": 16, "speedup_fwd": 1.0}]
    sc002 = next(c for c in claims([], {}, None, layer_rows=layers) if c[0].startswith("SC-002"))
    assert sc002[1] == "held only at B = 128 (4096->14336, 14336->4096)" and "B = 16: 4096->14336 1.00x" in sc002[2]
    none = next(c for c in claims([], {}, None, layer_rows=layers[2:]) if c[0].startswith("SC-002"))
    assert none[1] == "refuted"
    assert next(c for c in claims([], {}, None, layer_rows=layers[:2]) if c[0].startswith("SC-002"))[1] == "held"
