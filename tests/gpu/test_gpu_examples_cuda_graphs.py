"""The README's quick start and examples/train_hf.py on the CUDA-graph path (--cuda-graphs: every decoder
layer compiled with mode="reduce-overhead"), through topology decisions: each runs to the end, learns
(the loss falls), and changes its topology. Skipped without CUDA."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
ROOT = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)


def run(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_quickstart_trains_through_decisions_under_cuda_graphs():
    out = run("examples/quickstart.py", "--cuda-graphs", "--steps", "60", "--update-every", "20")
    assert "compiled into CUDA graphs: model.layers.1, model.layers.2" in out
    rows = re.findall(r"^\|\s*(\d+)\s*\|\s*([\d.]+)\s*\|\s*(\d+)\s*\|", out, flags=re.M)
    steps = {int(step): (float(loss), int(swaps)) for step, loss, swaps in rows}
    assert steps[60][0] < steps[1][0], steps  # it learns
    assert steps[60][1] > 0, steps  # and its topology changed


def test_train_hf_trains_through_decisions_under_cuda_graphs(tmp_path):
    run("examples/train_hf.py", "--cuda-graphs", "--device", "cuda", "--steps", "120", "--update-every", "40",
        "--out", str(tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["decisions"] >= 2 and summary["steps"] == 120
    assert summary["final_loss"] is not None and summary["final_loss"] < 4.5  # ln(128) = 4.85 at the start
