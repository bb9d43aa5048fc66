"""The Triton kernels on CPU through Triton's interpreter, against a float64 reference.

TRITON_INTERPRET must be set before triton is first imported, and the rest of the suite imports
torch and sparsify (and maybe triton) first, so the checks run in a child pytest process with
TRITON_INTERPRET=1 (they select the Triton backend with set_kernel_options):
`test_kernels_under_the_interpreter` starts it and
fails with its output when any check there fails. The checks themselves live in
triton_interpreter_checks.py (not collected by the parent run: its name does not start with test_).
Small shapes; every block size 16..128; float32 and bfloat16; forward,
grad_input, grad_values and the bias grad; token counts that are not multiples of any tile; K from
1 to C; outputs NaN-poisoned before the kernel writes them; gradients repeated and compared bitwise;
column indices outside [0, C) (-1, C, 100000, an int64 that wraps to 0): nothing read, nothing added,
and the device-side check fails.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

CHECKS = os.path.join(os.path.dirname(__file__), "triton_interpreter_checks.py")


def test_kernels_under_the_interpreter():
    pytest.importorskip("triton")
    env = {name: value for name, value in os.environ.items() if not name.startswith("SPARSIFY_")}
    env["TRITON_INTERPRET"] = "1"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", CHECKS, "-p", "no:cacheprovider", "-x"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, f"interpreter checks failed:\n{done.stdout[-8000:]}\n{done.stderr[-4000:]}"
    summary = done.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 50 and "skipped" not in summary, summary


