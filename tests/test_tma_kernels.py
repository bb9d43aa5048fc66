"""The tensor-descriptor backward kernels on CPU through Triton's interpreter, against a float64
reference (the checks: tma_interpreter_checks.py, run in a child pytest process, since TRITON_INTERPRET
must be set before triton is first imported)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

CHECKS = os.path.join(os.path.dirname(__file__), "tma_interpreter_checks.py")


def test_tma_kernels_under_the_interpreter():
    pytest.importorskip("triton")
    env = {name: value for name, value in os.environ.items() if not name.startswith("SPARSIFY_")}
    env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, "-m", "pytest", CHECKS, "-p", "no:cacheprovider", "-x", "-q"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"interpreter checks failed:\n{done.stdout[-8000:]}\n{done.stderr[-4000:]}"
    summary = done.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 45 and "skipped" not in summary, summary
