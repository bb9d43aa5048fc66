"""The distributed benchmark's smoke mode: 2 CPU processes over gloo under torchrun, dense and sparse (decided
and fixed topology), eager and compiled (aot_eager), alone, DDP (buffer broadcast on and off) and FSDP2;
the sparse runs decide inside the window and end with one topology and one set of
block values per run (always on the CPU, whatever SPARSIFY_TEST_DIST_DEVICE says)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]



def _run_tiny(tmp_path, *extra: str) -> tuple[dict, str]:
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
               str(ROOT / "benchmarks" / "bench_distributed.py"), "--device", "cpu", "--tiny", "--out", str(tmp_path), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (path,) = tmp_path.glob("distributed-cpu-2x-tiny-*.json")
    record = json.loads(path.read_text())
    assert record["world_size"] == 2 and record["backend"] == "gloo" and record["versions"]["torch"]
    assert record["devices"] == ["cpu", "cpu"]
    return record, done.stdout


def _assert_ranks_agree(sparse: dict, decisions: int) -> None:
    assert sparse["decisions"] >= decisions and sparse["same_topology_on_every_rank"], sparse
    assert len(sparse["checksum_per_rank"]) == 2 and sparse["scaling_efficiency"] > 0
    # every rank's block values (FSDP2: the gathered full tensors) are bitwise the same
    digests = sparse["values_digest_per_rank"]
    assert len(digests) == 2 and sparse["same_values_on_every_rank"], sparse
    assert digests[0] == digests[1] and len(digests[0]["sha256"]) == 64 and digests[0]["float64_sum"] != 0
    assert sparse["decisions_per_rank"] == [sparse["decisions"]] * 2 and sparse["swaps_per_rank"][0] == sparse["swaps_per_rank"][1]


def test_bench_distributed_tiny_on_two_cpu_processes_writes_agreeing_checksums(tmp_path):
    record, stdout = _run_tiny(tmp_path, "--topology", "decide", "off", "--broadcast-buffers", "on", "off")
    runs = {(r["model"], r["topology"], r["mode"], r["broadcast_buffers"]): r for r in record["runs"]}
    modes = [("single", "-"), ("ddp", "on"), ("ddp", "off"), ("fsdp", "-")]
    assert set(runs) == {(m, t, mode, b) for m, t in (("dense", "-"), ("sparse", "decide"), ("sparse", "off"))
                         for mode, b in modes}
    assert all(r["execution"] == "eager" and r["host_ms"] > 0 for r in record["runs"])
    for mode, broadcast in modes[1:]:
        _assert_ranks_agree(runs["sparse", "decide", mode, broadcast], decisions=2)
        off = runs["sparse", "off", mode, broadcast]  # plain AdamW: a fixed topology, no topology collectives
        assert off["decisions"] == 0 and off["topology_collective_calls"] == 0 and off["same_topology_on_every_rank"]
    assert runs["sparse", "decide", "ddp", "on"]["topology_collective_calls"] > 0
    assert "same topology" in stdout and "same values" in stdout  # the table was printed
    assert "values sha256" in stdout  # and the per-rank digests with the checksums


def test_bench_distributed_tiny_compiled_decides_without_recompiling_and_ranks_agree(tmp_path):
    record, _ = _run_tiny(tmp_path, "--execution", "compiled", "compiled-layers", "--models", "sparse",
                          "--modes", "single", "ddp")
    runs = {(r["execution"], r["mode"]): r for r in record["runs"]}
    assert set(runs) == {(e, m) for e in ("compiled", "compiled-layers") for m in ("single", "ddp")}
    assert record["config"]["compile_backend"] == "aot_eager"
    for run in runs.values():
        assert run["compiled_graphs"] >= 1 and run["graphs_compiled_after_first_step"] == 0, run  # no recompile
    assert runs["compiled-layers", "single"]["compiled_graphs"] == 1  # both decoder layers share one graph
    for execution in ("compiled", "compiled-layers"):
        _assert_ranks_agree(runs[execution, "ddp"], decisions=2)
