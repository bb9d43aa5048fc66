"""benchmarks/bench_training.py on a toy model on the CPU: the topology cost table and its JSON."""

from __future__ import annotations

import contextlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from sparsify import sparse_layers

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--layers", "1", "--hidden", "64", "--mlp", "128", "--vocab", "64", "--batch", "1", "--seq", "16", "--device", "cpu",
        "--no-compile"]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_training", ROOT / "benchmarks" / "bench_training.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_seeds_preset_sets_the_seeds_shape_and_explicit_flags_override_it():
    bench = load_bench()
    args = bench.parse(["--preset", "seeds", "--batch", "4", "--compile-mode", "reduce-overhead"])
    assert (args.layers, args.hidden, args.mlp, args.seq, args.batch) == (16, 640, 2560, 512, 4)
    assert args.compile_mode == "reduce-overhead"
    default = bench.parse([])
    assert (default.layers, default.hidden, default.mlp, default.compile_mode) == (12, 2048, 8192, "default")


def test_graph_check_fails_when_the_compiled_path_keeps_the_topology_it_was_built_with():
    bench = load_bench()
    args = bench.parse(TINY)
    model = bench.build(args, 0.5, 16)
    bench._set_probes(model, True)
    x = torch.randint(0, args.vocab, (1, args.seq), generator=torch.Generator().manual_seed(0))
    eager = {"on": False}

    @contextlib.contextmanager
    def eager_context():
        eager["on"] = True
        yield
        eager["on"] = False

    # a stand-in for a graph that recorded the topology: outside eager_context every layer reads a frozen copy
    for _, layer in sparse_layers(model):
        def stale_forward(inp, layer=layer, frozen=layer.col_indices.clone(), forward=layer.forward):
            if eager["on"]:
                return forward(inp)
            current = layer.col_indices
            layer.col_indices = frozen
            try:
                return forward(inp)
            finally:
                layer.col_indices = current
        layer.forward = stale_forward
    check = bench.graph_check(model, args, x, eager=eager_context)
    assert check["relative_error_before"]["values_max"] < 1e-5  # same topology on both paths: same gradients
    assert check["relative_error_after_rewrite"]["values_max"] > 0.5 and not check["passed"]


def test_bench_training_reports_scoring_and_level2_against_the_two_percent_target(tmp_path, capsys):
    bench = load_bench()
    bench.main([*TINY, "--block-sizes", "16", "--steps", "3", "--warmup", "1",
                "--update-every", "2", "--decisions", "3", "--mem-densities", "0.5", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("training-cpu-*.json")
    record = json.loads(path.read_text())
    (bound,) = [r for r in record["steps"] if r["label"] == "dense without its MLPs"]
    (dense,) = [r for r in record["steps"] if r["label"] == "dense"]
    share = bound["mlp_share"]  # the part of dense's step its MLPs take, from the two measured steps
    assert 0 <= share < 1 and share == pytest.approx(max(0.0, 1 - bound["step_ms"] / dense["step_ms"]))
    assert bound["speedup_bound"] == pytest.approx(1 / (1 - share + 0.5 * share)) and bound["bound_density"] == 0.5
    (row,) = record["topology"]
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
