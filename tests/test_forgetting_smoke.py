"""examples/forgetting.py --smoke: every arm trains on the CPU, the report has its parts, reruns resume."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "forgetting.py"
ARMS = ("dense", "ewc", "static-0.5", "dynamic-0.25", "dynamic-0.5", "dynamic-0.75", "dynamic-0.5-b64",
        "protected-0.5", "anchored-0.5")
SECTIONS = ("## Setup", "## Forgetting per arm", "## Forgetting at equal task-B learning", "## Accuracy through A then B",
            "## Topology: pathways, swaps, entropy, spikes", "## Final quality against dense", "## Claims")
CLAIMS = ("SC-001", "SC-002", "SC-003", "SC-004", "SC-005", "SC-006", "SC-007", "US1-1", "US1-2", "US1-3")


def _run(out: Path) -> float:
    """CPU seconds the smoke run used (user + system, not wall time: CI machines are shared)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], cwd=ROOT, check=True,
                   capture_output=True, text=True, timeout=600)
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
    assert {r["arm"] for r in runs} >= set(ARMS)
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
            assert any(v in line for v in ("held", "refuted", "not measured")), line
    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert figures == ["accuracy_a_then_b.png", "forgetting_bars.png", "forgetting_vs_b_loss_answer_bytes.png",
                       "forgetting_vs_b_loss_exact_match.png", "masks_a_vs_b.png",
                       "topology_dynamics.png"]
    assert all(f"]({Path('figures') / name})" in report for name in figures)


def test_smoke_finishes_within_a_minute_and_a_rerun_resumes_without_training(smoke):
    out, seconds = smoke
    assert seconds < 60, f"--smoke used {seconds:.0f} CPU seconds"
    before = {p: p.stat().st_mtime for p in (out / "runs").glob("*.json")}
    _run(out)
    assert {p: p.stat().st_mtime for p in (out / "runs").glob("*.json")} == before
