"""run.py --smoke: every arm trains on the CPU, the report has its parts, reruns resume;
the grid's order and deadline rule; the answer metric against greedy decoding problem by problem."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]  # the repository
SCRIPT = Path(__file__).resolve().parents[1] / "run.py"
ARMS = ("dense", "ewc", "static-0.5", "dynamic-0.25", "dynamic-0.5", "dynamic-0.75", "dynamic-0.5-b64",
        "protected-0.5", "anchored-0.5", "consolidated-0.5", "finetune-0.5", "ewc-0.5", "replay-0.01", "replay-0.1", "lora")
SECTIONS = ("## Setup", "## Runs per arm", "## Forgetting per arm", "## Forgetting at equal task-B learning", "## Paired by seed",
            "## Accuracy through A then B",
            "## Topology: pathways, swaps, entropy, spikes", "## Final quality against dense", "## Claims")
CLAIMS = ("SC-001", "SC-002", "SC-003", "SC-004", "SC-005", "SC-006", "SC-007", "US1-1", "US1-2", "US1-3")


def _run(out: Path) -> float:
    """CPU seconds the smoke run used (user + system, not wall time: CI machines are shared)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], cwd=ROOT, check=True,
                   capture_output=True, text=True, timeout=600, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("forgetting")
    seconds = _run(out)
    return out, seconds


def _falls(loss: list[float]) -> bool:
    k = max(1, len(loss) // 5)
    return sum(loss[-k:]) / k < sum(loss[:k]) / k


def test_every_arm_trained_task_a_then_task_b_and_its_loss_went_down(smoke):
    out, _ = smoke
    runs = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    failed = json.loads((out / "grid.json").read_text())["failed"]  # the lora arm fails without peft
    assert {r["arm"] for r in runs} >= set(ARMS), f"missing {set(ARMS) - {r['arm'] for r in runs}}; failed: {failed}"
    for r in runs:
        assert _falls(r["a"]["phase"]["loss"]), f"{r['arm']}: task-A loss did not go down"
        assert _falls(r["phase"]["loss"]), f"{r['arm']}: task-B loss did not go down"
        evals = r["phase"]["evals"]
        assert evals[-1]["b_test_loss"] < evals[0]["b_test_loss"], f"{r['arm']}: held-out B loss did not improve"


def test_dynamic_arms_swap_blocks_and_protected_blocks_stay_frozen(smoke):
    out, _ = smoke
    runs = {r["arm"]: r for r in (json.loads(p.read_text()) for p in (out / "runs").glob("*.json")) if r["lr"] == 3e-3}
    assert sum(d["swaps"] for d in runs["dynamic-0.5"]["decisions"]) > 0
    assert not runs["static-0.5"]["decisions"]
    assert runs["static-0.5"]["topology_a"] == runs["static-0.5"]["topology_b"]
    assert runs["protected-0.5"]["protected_slots"] and all(v == 0.0 for v in runs["protected-0.5"]["protected_max_drift"].values())
    assert any(v > 0.0 for v in runs["anchored-0.5"]["protected_max_drift"].values())  # anchored slots still learn


def test_baseline_arms_train_what_they_name(smoke):
    from forgetting.baselines import sparse_trainable
    from forgetting.run import SMOKE

    out, _ = smoke
    runs = {r["arm"]: r for r in (json.loads(p.read_text()) for p in (out / "runs").glob("*.json")) if r["lr"] == 3e-3}
    dense_params = runs["dense"]["trainable"]
    assert runs["finetune-0.5"]["a"]["key"] == "dynamic-0.5" and runs["finetune-0.5"]["trainable"] == dense_params
    assert runs["finetune-0.5"]["topology_b"] == {}  # densified: no block-sparse layer left
    assert runs["ewc-0.5"]["a"]["key"] == "dynamic-0.5" and runs["ewc-0.5"]["topology_a"] == runs["ewc-0.5"]["topology_b"]
    assert runs["ewc-0.5"]["ewc_lambda"] == runs["ewc"]["ewc_lambda"]
    assert runs["replay-0.1"]["a"]["key"] == "dense" and runs["replay-0.1"]["trainable"] == dense_params
    consolidated = runs["consolidated-0.5"]
    assert consolidated["a"]["key"] == "dynamic-0.5" and consolidated["decisions"]  # B's decisions on B's clock
    assert all(d["step"] <= consolidated["config"]["b_steps"] for d in consolidated["decisions"])
    # LoRA's adapters: within half a rank's parameters of the sparse arms' trainable block values
    rank, target = runs["lora"]["lora_rank"], sparse_trainable(SMOKE["model"], 0.5)
    assert abs(runs["lora"]["trainable"] - target) <= runs["lora"]["trainable"] / rank / 2


def test_report_has_every_section_arm_claim_and_figure(smoke):
    out, _ = smoke
    report = (out / "report.md").read_text()
    for section in SECTIONS:
        assert section in report
    table = report.split("## Forgetting per arm")[1].split("##")[0]
    for arm in ARMS:
        assert f"| {arm} " in table
    claims = report.split("## Claims")[1]
    for claim in CLAIMS:
        assert claim in claims
    rows = [line for line in claims.splitlines() if line.startswith("|")][2:]  # after the header and its rule
    assert len(rows) >= len(CLAIMS)
    for line in rows:
        if line.startswith("|"):
            assert any(v in line for v in ("held", "refuted", "inconclusive", "not measured")), line
    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert figures == ["accuracy_a_then_b.png", "forgetting_bars.png", "forgetting_vs_b_loss_answer_bytes.png",
                       "forgetting_vs_b_loss_exact_match.png", "forgetting_vs_b_step.png", "masks_a_vs_b.png",
                       "topology_dynamics.png"]
    paired = report.split("## Paired by seed")[1].split("\n## ")[0]
    for arm in ARMS:
        assert f"| {arm} " in paired
    for ref in ("vs dense", "vs ewc", "vs replay-0.01", "vs replay-0.1", "vs lora"):
        assert ref in paired
    assert all(f"]({Path('figures') / name})" in report for name in figures)


def test_smoke_finishes_within_a_minute_and_a_rerun_resumes_without_training(smoke):
    from forgetting.run import main

    out, seconds = smoke
    assert seconds < 60, f"--smoke used {seconds:.0f} CPU seconds"
    before = {p: p.stat().st_mtime for p in (out / "runs").glob("*.json")}
    outcome = main(["--smoke", "--out", str(out), "--no-report"])  # the command line's path, in this process
    assert outcome["seconds"] == {} and not outcome["failed"]
    assert {p: p.stat().st_mtime for p in (out / "runs").glob("*.json")} == before


# ---------------------------------------------------------------- the grid's order and deadline (no training)
def test_plan_puts_the_whole_base_table_before_any_sweep_and_late_arms_last():
    from forgetting.arms import make_arms
    from forgetting.grid import plan
    from forgetting.train import ExpConfig

    cfg = ExpConfig()
    jobs = plan(make_arms(), 3, cfg, sweep=True)
    names = [j.path(Path(".")).name for j in jobs]
    kinds = [j.kind for j in jobs]
    assert kinds == sorted(kinds), "every task-A run comes before the task-B runs"
    assert names[:6] == ["dense__s0.json", "dynamic-0.5__s0.json", "dynamic-0.5__s1.json", "dynamic-0.5__s2.json",
                         "dense__s1.json", "dense__s2.json"], "the task-A runs most B runs wait on come first"
    base = [i for i, j in enumerate(jobs) if j.kind == "B" and j.lr == cfg.b_lrs[1] and not j.lam_search]
    sweeps = [i for i, j in enumerate(jobs) if j.kind == "B" and j.lr != cfg.b_lrs[1]]
    search = [i for i, j in enumerate(jobs) if j.lam_search]
    assert len(base) == 9 * 3 and len(search) == len(cfg.ewc_lambdas) and sweeps
    assert max(search) < min(base) and max(base) < min(sweeps)

    late = plan(make_arms(static_shares_a=True), 3, cfg, sweep=True, late=("static-0.5",))
    late_names = [j.path(Path(".")).name for j in late]
    assert late_names[1].startswith("dynamic-0.5__s"), "a task-A run shared with early arms is not late"
    late_at = [i for i, j in enumerate(late) if j.kind == "B" and j.arm.name == "static-0.5"]
    assert len(late_at) == 3 * 3 and min(late_at) == len(late) - len(late_at), "the late arm's runs come last"


def test_paired_design_trains_two_task_a_models_a_seed_and_starts_every_b_run_from_one():
    from forgetting.arms import paired_arms
    from forgetting.grid import plan
    from forgetting.train import ExpConfig

    cfg = ExpConfig()
    jobs = plan(paired_arms(0.5), 8, cfg, sweep=True)
    a_jobs = [j for j in jobs if j.kind == "A"]
    assert sorted((j.arm.a_key, j.seed) for j in a_jobs) == sorted((k, s) for k in ("dense", "dynamic-0.5") for s in range(8))
    b_jobs = [j for j in jobs if j.kind == "B"]
    assert {j.arm.a_key for j in b_jobs} == {"dense", "dynamic-0.5"}
    starts = {j.arm.name: j.arm.a_key for j in b_jobs}
    assert {n for n, k in starts.items() if k == "dense"} == {"dense", "ewc", "replay-0.01", "replay-0.1", "lora"}
    swept = {j.arm.name for j in b_jobs if j.lr != cfg.b_lrs[1]}
    assert swept == set(starts)  # every arm at three B learning rates: a curve each, compared at equal B learning
    assert all(len([j for j in b_jobs if j.arm.name == n and j.lr == cfg.b_lrs[1] and not j.lam_search]) == 8
               for n in starts)


def test_grid_starts_no_run_that_cannot_finish_before_the_deadline(tmp_path, monkeypatch):
    from forgetting import grid
    from forgetting.arms import Arm
    from forgetting.train import ExpConfig

    clock = [1000.0]
    monkeypatch.setattr(grid.time, "time", lambda: clock[0])

    def fake_execute(job, cfg, out, deadline):  # task A: 10 s dense, 20 s sparse; task B: 5 s
        took = (10 if job.arm.density is None else 20) if job.kind == "A" else 5
        clock[0] += took
        for path in (job.path(out), job.path(out).with_suffix(".pt")):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}")
        return took, True

    monkeypatch.setattr(grid, "execute", fake_execute)
    arms = {"dense": Arm("dense"), "dynamic-0.5": Arm("dynamic-0.5", density=0.5, dynamic=True)}
    jobs = grid.plan(arms, 2, ExpConfig(a_steps=100, b_steps=100), sweep=False)
    outcome = grid.run_grid(jobs, ExpConfig(a_steps=100, b_steps=100), tmp_path, 0, deadline=1000.0 + 56)
    # dense s0 ends at 10 s, dynamic s0 (no sparse estimate yet: dense's 10 s) at 30, dense s1 at 40;
    # dynamic s1 would need 1.1 x 20 s from 40: not started, nor its B run. The B runs (estimated from
    # task A's 10 s, then from B's 5 s) end at 45, 50 and 55
    assert list(outcome["seconds"]) == ["dense__s0.json", "dynamic-0.5__s0.json", "dense__s1.json",
                                        "dense__s0__lr0.0003.json", "dynamic-0.5__s0__lr0.0003.json",
                                        "dense__s1__lr0.0003.json"]
    assert outcome["skipped"] == ["dynamic-0.5__s1.json", "dynamic-0.5__s1__lr0.0003.json"]
    assert clock[0] <= 1000.0 + 56
    assert json.loads((tmp_path / "grid.json").read_text())["skipped"] == outcome["skipped"]


# ---------------------------------------------------------------- the answer metric
class _Oracle:
    """A causal stand-in for the model: after ``A: `` it spells the true answer and its newline, except
    that it gets the second answer byte wrong for questions starting with an odd digit."""

    training = False

    def __init__(self, answers: dict[str, str]):
        self.answers = answers

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def __call__(self, input_ids, use_cache=False):
        from types import SimpleNamespace

        n, width = input_ids.shape
        logits = torch.zeros(n, width, 256)
        for row in range(n):
            text = bytes(input_ids[row].tolist()).decode("latin-1")
            for t in range(width):
                prefix = text[: t + 1]
                guess = 0
                if " A: " in prefix:
                    question, so_far = prefix[4:].split(" A: ", 1)
                    answer = self.answers[question] + "\n"
                    if answer.startswith(so_far) and len(so_far) < len(answer):
                        guess = ord(answer[len(so_far)])
                        if len(so_far) == 1 and question[0] in "13579":
                            guess = ord("?")
                logits[row, t, guess] = 1.0
        return SimpleNamespace(logits=logits)


def test_teacher_forced_scores_equal_greedy_decoding_problem_by_problem():
    from forgetting.data import MathTask, encode
    from forgetting.evaluate import answer_scores

    problems = MathTask.generate(n_train=10, n_val=10, n_test=60).test
    model = _Oracle(dict(problems))
    exact, right, total = 0, 0, 0
    for q, a in problems:  # greedy decoding, one byte at a time
        ids = encode(f"\nQ: {q} A: ")
        target = encode(f"{a}\n")
        out = []
        for _ in target:
            out.append(int(model(torch.tensor([ids + out])).logits[0, -1].argmax()))
        exact += out == target
        for k, byte in enumerate(target):  # answer bytes given the true prefix
            right += int(model(torch.tensor([ids + target[:k]])).logits[0, -1].argmax()) == byte
        total += len(target)
    scores = answer_scores(model, problems, "cpu", batch=7)  # batches of uneven widths
    assert 0 < exact < len(problems)
    assert scores == (exact / len(problems), right / total)
    assert answer_scores(model, problems, "cpu", batch=7) == scores  # the cached encoding


# ---------------------------------------------------------------- the baselines and the paired differences
def test_replay_marks_exactly_the_fraction_of_b_sequences_at_seeded_places():
    from forgetting.baselines import replay_rows

    rows = replay_rows(steps=50, batch=8, fraction=0.1, seed=0)
    assert rows.shape == (50, 8) and int(rows.sum()) == 40
    assert torch.equal(rows, replay_rows(50, 8, 0.1, seed=0)) and not torch.equal(rows, replay_rows(50, 8, 0.1, seed=1))
    assert int(replay_rows(50, 8, 0.01, seed=0).sum()) == 4


def _record(arm: str, seed: int, lr: float, b_loss: float, after: float, before: float = 0.8) -> dict:
    evals = [{"step": 0, "acc_test": before, "b_test_loss": 9.0}, {"step": 10, "acc_test": after, "b_test_loss": b_loss}]
    return {"arm": arm, "seed": seed, "lr": lr, "arm_spec": {}, "phase": {"evals": evals}}


def test_paired_differences_cancel_the_seed_to_seed_spread():
    from forgetting import paired

    # dense forgets 20-60% depending on the seed (x B loss); the arm 5 points less than dense in every seed
    runs = []
    for seed, spread in enumerate((0.0, 0.2, 0.4)):
        for lr, loss in ((1e-4, 4.0), (3e-4, 3.0)):
            forgot = 0.2 + spread + 0.1 * (4.0 - loss)
            runs.append(_record("dense", seed, lr, loss, after=0.8 * (1 - forgot)))
        runs.append(_record("arm", seed, 3e-4, 3.5, after=0.8 * (1 - (0.2 + spread + 0.05 - 0.05))))
    diffs = paired.at_equal_loss(paired.groups(runs), "arm", "dense", 3e-4, 1, "acc_test")
    assert diffs == pytest.approx([-0.05] * 3)
    found = paired.differences(paired.groups(runs), "arm", 1, "acc_test")
    assert set(found) == {("dense", 3e-4)} and found[("dense", 3e-4)][1] == pytest.approx(0.0, abs=1e-9)
    assert paired.verdict(found) == "held"
    runs.append(_record("arm", 3, 3e-4, 3.5, after=0.0))  # a seed with no dense runs: left out, not paired
    assert len(paired.at_equal_loss(paired.groups(runs), "arm", "dense", 3e-4, 1, "acc_test")) == 3


# ---------------------------------------------------------------- calibrating task A's length
def test_a_task_a_run_cut_at_the_deadline_leaves_its_curve_and_is_not_done(tmp_path):
    import dataclasses
    import time

    from forgetting import grid
    from forgetting.arms import Arm
    from forgetting.run import SMOKE
    from forgetting.train import DeadlinePassed, ExpConfig

    prose = tmp_path / "prose.json"
    prose.write_text(json.dumps({split: ["The quick brown fox jumps over the lazy dog. " * 8] * 20
                                 for split in ("train", "val", "test")}))
    cfg = dataclasses.replace(ExpConfig(**SMOKE), a_steps=50, a_evals=5, prose_file=str(prose))
    job = grid.Job(0, "A", Arm("dense"), 0)
    with pytest.raises(DeadlinePassed):  # the deadline is checked every 50 steps: the run stops at step 50
        grid.execute(job, cfg, tmp_path, deadline=time.time() - 1)
    curve = json.loads((tmp_path / "cut" / "dense__s0.json").read_text())
    assert curve["cut"] and curve["key"] == "dense" and curve["phase"]["steps_done"] == 50
    assert [e["step"] for e in curve["phase"]["evals"]] == [0, 10, 20, 30, 40, 50]
    assert len(curve["phase"]["loss"]) == 50
    assert not job.done(tmp_path) and not job.path(tmp_path).exists()


def test_runs_restored_without_their_task_a_checkpoint_are_run_again(tmp_path):
    from forgetting.arms import Arm
    from forgetting.grid import Job

    a_job, b_job = Job(0, "A", Arm("dense"), 0), Job(2, "B", Arm("dense"), 0, 3e-4)
    for job in (a_job, b_job):  # a results folder restored from the tarball: JSONs only
        job.path(tmp_path).parent.mkdir(parents=True, exist_ok=True)
        job.path(tmp_path).write_text("{}")
    assert not a_job.done(tmp_path) and not b_job.done(tmp_path)
    a_job.path(tmp_path).with_suffix(".pt").write_text("")
    assert a_job.done(tmp_path) and b_job.done(tmp_path)
