"""A task-A run cut at the deadline goes on from its saved state in the next grid, bit-identically to a run
never cut; a restored results folder (JSONs only) reruns only the seeds that still need their task-A model."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    from forgetting.run import SMOKE
    from forgetting.train import ExpConfig

    prose = tmp_path_factory.mktemp("prose") / "prose.json"
    prose.write_text(json.dumps({split: ["The quick brown fox jumps over the lazy dog. " * 8] * 20
                                 for split in ("train", "val", "test")}))
    # 64 steps, cut at step 50 (the deadline is checked every 50 steps); decisions every 8 steps, so the
    # cut falls between two of them and the one at step 56 reads block statistics from before the cut
    return dataclasses.replace(ExpConfig(**SMOKE), a_steps=64, a_evals=4, n_train=2000, prose_file=str(prose))


def _comparable(summary: dict) -> dict:
    """A task-A summary without its timings."""
    phase = {k: v for k, v in summary["phase"].items() if k not in ("seconds", "eval_seconds", "resumed_after")}
    decisions = [{k: v for k, v in d.items() if k != "seconds"} for d in summary["decisions"]]
    return {"phase": phase, "decisions": decisions, **{k: summary[k] for k in ("acc_test", "acc_val", "b_val_loss")}}


def _assert_equal_tensors(a, b, where=""):
    """Nested states equal, tensors bit for bit (timings, named ``seconds``, aside)."""
    if torch.is_tensor(a):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a.keys() - {"seconds"}:
            _assert_equal_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("arm_name", ["dense", "dynamic-0.5"])
def test_a_task_a_run_cut_at_the_deadline_and_resumed_ends_as_the_uncut_run(cfg, tmp_path, arm_name):
    from forgetting import grid
    from forgetting.arms import paired_arms
    from forgetting.train import DeadlinePassed

    job = grid.Job(0, "A", paired_arms()[arm_name], 0)
    straight, out = tmp_path / "straight", tmp_path / "out"
    grid.execute(job, cfg, straight, deadline=None)

    with pytest.raises(DeadlinePassed):  # cut at step 50 of 64
        grid.execute(job, cfg, out, deadline=time.time() - 1)
    curve = json.loads((out / "cut" / job.path(out).name).read_text())
    assert curve["phase"]["steps_done"] == 50 and not job.done(out) and (out / "cut" / f"{job.path(out).stem}.pt").exists()
    assert grid._steps_left(job, cfg, out) == 14

    grid.execute(job, cfg, out, deadline=None)  # the next grid: from step 51 on
    resumed = json.loads(job.path(out).read_text())
    assert resumed["phase"]["resumed_after"] == 50 and job.done(out)
    assert not list((out / "cut").iterdir())  # the cut run's files are gone once it finished
    uncut = json.loads(job.path(straight).read_text())
    assert _comparable(resumed) == _comparable(uncut)
    if arm_name != "dense":
        assert any(d["step"] > 50 and d["swaps"] for d in resumed["decisions"]), "decisions after the cut swap blocks"
    # the model, the Fisher, the saliency and the topology statistics task B starts from
    _assert_equal_tensors(torch.load(out / "a" / f"{job.path(out).stem}.pt", weights_only=True),
                          torch.load(straight / "a" / f"{job.path(out).stem}.pt", weights_only=True))


def test_a_cut_runs_state_saved_under_other_settings_is_not_resumed(cfg, tmp_path):
    from forgetting import grid
    from forgetting.arms import Arm
    from forgetting.train import DeadlinePassed

    job = grid.Job(0, "A", Arm("dense"), 0)
    with pytest.raises(DeadlinePassed):
        grid.execute(job, cfg, tmp_path, deadline=time.time() - 1)
    saved = tmp_path / "cut" / "dense__s0.pt"
    assert grid._resume_state(job, cfg, saved)["step"] == 50
    assert grid._resume_state(job, dataclasses.replace(cfg, a_lr=cfg.a_lr / 2), saved) is None
    assert grid._resume_state(job, dataclasses.replace(cfg, b_steps=cfg.b_steps + 1), saved) is not None  # B's only
    assert grid._resume_state(grid.Job(0, "A", Arm("dense"), 1), cfg, saved) is None  # another seed's


def test_a_restored_folder_reruns_only_the_seeds_whose_runs_are_not_all_done(tmp_path, monkeypatch):
    from forgetting import grid
    from forgetting.arms import Arm
    from forgetting.train import ExpConfig

    ran = []

    def fake_execute(job, cfg, out, deadline):
        ran.append(job.path(out).name)
        for path in (job.path(out), grid._a_files(out, job.arm, job.seed)[1]):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}")
        return 1.0, True

    monkeypatch.setattr(grid, "execute", fake_execute)
    cfg = ExpConfig(b_lrs=(1e-4, 3e-4, 1e-3))
    jobs = grid.plan({"dense": Arm("dense")}, 2, cfg, sweep=True)
    restored = [j for j in jobs if j.seed == 0] + [j for j in jobs if j.seed == 1][:2]  # seed 1: A and one B run
    for job in restored:  # JSONs only, as a device call's tarball brings them back
        job.path(tmp_path).parent.mkdir(parents=True, exist_ok=True)
        job.path(tmp_path).write_text("{}")
    assert grid.complete_units(jobs, tmp_path) == {("dense", 0)}
    grid.run_grid(jobs, cfg, tmp_path, 0, deadline=None)
    assert sorted(ran) == sorted(j.path(tmp_path).name for j in jobs if j.seed == 1)  # A again, then all its B runs


def test_the_paired_plans_differ_only_in_their_seeds_so_every_session_resumes_and_pairs_alike():
    from dataclasses import asdict

    from forgetting.run import config, parse

    lines = {}
    for plan in sorted((Path(__file__).resolve().parents[1] / "plans").glob("paired_s*.txt")):
        rows = [line.split() for line in plan.read_text().splitlines() if line.strip() and not line.startswith("#")]
        assert len(rows) == 1 and int(rows[0][1]) <= 14, plan.name  # one grid, at most a worker a core less two
        lines[plan.name] = parse(["run", "--device", "cuda", "--tf32"] + rows[0][2:])
    assert [a.seeds for a in lines.values()] == [3, 6, 8]  # seeds 0-2, then 3-5, then 6-7
    settings = [asdict(config(a)) for a in lines.values()]  # every run's settings (the seeds are not among them)
    assert all(s == settings[0] for s in settings) and settings[0]["a_steps"] == 6000
    assert settings[0]["a_steps"] // settings[0]["a_evals"] == 200  # task A evaluated every 200 steps
    assert all(a.paired and not a.no_sweep and a.ewc_lambdas == [1e3, 1e4, 1e5, 1e6, 1e7] for a in lines.values())


def test_task_a_plateau_is_the_mean_rise_over_the_last_fifth_of_the_steps():
    from forgetting.analysis import a_plateau

    def run(key, accs):  # evaluations every 200 steps of 1000
        return {"key": key, "phase": {"evals": [{"step": 200 * i, "acc_test": a} for i, a in enumerate(accs)]}}

    found = a_plateau([run("dense", [0, 0.2, 0.4, 0.6, 0.70, 0.72]), run("dense", [0, 0.2, 0.4, 0.6, 0.80, 0.90]),
                       run("dynamic-0.5", [0, 0.5, 0.8, 0.9, 0.95, 0.96])])
    assert found["dense"]["from"] == 800 and found["dense"]["to"] == 1000 and found["dense"]["seeds"] == 2
    assert found["dense"]["rise"] == pytest.approx(0.06) and found["dense"]["lowest_end"] == 0.72
    assert found["dynamic-0.5"]["rise"] == pytest.approx(0.01)
