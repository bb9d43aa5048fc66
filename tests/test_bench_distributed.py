"""The distributed benchmark's smoke mode: 2 CPU processes over gloo under torchrun, dense and sparse,
alone, DDP and FSDP2; the sparse runs decide inside the window and end with one topology and one set of
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



def test_bench_distributed_tiny_on_two_cpu_processes_writes_agreeing_checksums(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(free_port()), str(ROOT / "benchmarks" / "bench_distributed.py"), "--device", "cpu", "--tiny", "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (path,) = tmp_path.glob("distributed-cpu-tiny-*.json")
    record = json.loads(path.read_text())
    assert record["world_size"] == 2 and record["backend"] == "gloo" and record["versions"]["torch"]
    runs = {(r["model"], r["mode"]): r for r in record["runs"]}
    assert set(runs) == {(m, mode) for m in ("dense", "sparse") for mode in ("single", "ddp", "fsdp")}
    for mode in ("ddp", "fsdp"):
        sparse = runs["sparse", mode]
        assert sparse["decisions"] >= 2 and sparse["same_topology_on_every_rank"], sparse
        assert len(sparse["checksum_per_rank"]) == 2 and sparse["scaling_efficiency"] > 0
        # every rank's block values (FSDP2: the gathered full tensors) are bitwise the same
        digests = sparse["values_digest_per_rank"]
        assert len(digests) == 2 and sparse["same_values_on_every_rank"], sparse
        assert digests[0] == digests[1] and len(digests[0]["sha256"]) == 64 and digests[0]["float64_sum"] != 0
        assert sparse["decisions_per_rank"] == [sparse["decisions"]] * 2 and sparse["swaps_per_rank"][0] == sparse["swaps_per_rank"][1]
    assert "same topology" in done.stdout and "same values" in done.stdout  # the table was printed
    assert "values sha256" in done.stdout  # and the per-rank digests with the checksums
