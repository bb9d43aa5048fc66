"""benchmarks/bench_training.py on a toy model on the CPU: the topology cost table and its JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_training_reports_scoring_and_level2_against_the_two_percent_target(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_training", ROOT / "benchmarks" / "bench_training.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--layers", "1", "--hidden", "64", "--mlp", "128", "--vocab", "64", "--batch", "1", "--seq", "16",
                "--device", "cpu", "--no-compile", "--block-sizes", "16", "--steps", "3", "--warmup", "1",
                "--update-every", "2", "--decisions", "3", "--mem-densities", "0.5", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("training-cpu-*.json")
    (row,) = json.loads(path.read_text())["topology"]
    assert row["decisions_in_window"] == 3 and row["level2_ms"]["count"] == 3 and len(row["level2_seconds_each"]) == 3
    assert row["level01_ms"]["count"] == 6  # Level 0 + 1 timed on every step of the deciding run
    step = row["step_ms"] / 1e3
    assert row["scoring_fraction"] == pytest.approx(row["level01_ms"]["median_ms"] / 1e3 / step)
    assert row["level2_fraction_per_decision"] == pytest.approx(row["level2_seconds_per_decision"] / step)
    total = row["scoring_fraction"] + row["level2_fraction_per_decision"] / 100
    assert row["overhead_fraction_at_update_every_100"] == pytest.approx(total)
    assert row["target_fraction"] == 0.02 and row["meets_target"] == (total < 0.02)
    out = capsys.readouterr().out
    assert "total at update_every=100 vs target" in out and "B=16" in out
