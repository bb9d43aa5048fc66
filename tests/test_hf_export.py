"""A saved ``torch.export`` program of a sparse model loads in another process once ``sparsify`` is
imported there (the import registers ``torch.ops.sparsify.*``), and fails without it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from sparsify import sparsify

LOADER = """
import sys, torch
folder = sys.argv[1]
try:
    torch.export.load(folder + "/model.pt2")
    print("LOADED WITHOUT SPARSIFY")
except Exception as error:
    print("WITHOUT SPARSIFY:", type(error).__name__)
import sparsify  # registers the ops
program = torch.export.load(folder + "/model.pt2")
x, expected = torch.load(folder + "/io.pt")
print("WITH SPARSIFY: equal" if torch.equal(program.module()(x), expected) else "WITH SPARSIFY: different")
"""


def test_a_saved_export_program_loads_and_runs_in_a_process_that_imports_sparsify(tmp_path: Path):
    torch.manual_seed(0)
    model = sparsify(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)), block_size=16).eval()
    x = torch.randn(3, 64)
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "model.pt2")
    torch.save((x, model(x)), tmp_path / "io.pt")
    run = subprocess.run([sys.executable, "-c", LOADER, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "WITHOUT SPARSIFY: " in run.stdout  # a load error, not a program missing its op
    assert "torch.ops.sparsify.block_ell_linear" in run.stderr  # torch names the op it cannot resolve
    assert "WITH SPARSIFY: equal" in run.stdout
