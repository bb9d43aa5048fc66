"""The grouped Gluon kernel (forward and grad_input) compiles for Hopper (sm_90) with the installed Triton, on a machine without a GPU:
benchmarks/gluon_compile_check.py in its own process (it replaces Triton's driver with a stand-in
that only names the target). Nothing runs; the GPU checks are tests/gpu/test_gpu_grouped_gluon.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "gluon_compile_check.py")


def test_grouped_gluon_kernels_compile_for_hopper_at_every_group_size_for_both_products():
    pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, SCRIPT, "--designs", "64:1:num_warps=4,32:2:STAGES=6,64:4:WS=1,64:2:BM=256"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert done.stdout.count(": OK,") == 8, done.stdout
