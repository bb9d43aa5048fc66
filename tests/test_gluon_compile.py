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
    done = subprocess.run([sys.executable, SCRIPT, "--designs", "64:1:num_warps=4,32:2:STAGES=6,64:4:WS=1,64:2:BM=256,64:2:BM=256:BOX_BARRIERS=1"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert done.stdout.count(": OK,") == 10, done.stdout


def test_the_gluon_decode_kernel_compiles_for_hopper_at_both_block_sizes():
    pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, SCRIPT, "--decode"], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert done.stdout.count(": OK,") == 2, done.stdout
    spills = [line for line in done.stdout.splitlines() if "spill loads" in line]  # where the bundled ptxas reads the PTX
    assert all("0 bytes spill stores, 0 bytes spill loads" in line for line in spills), done.stdout


def _loop(second_branch_entered_from_the_first: bool) -> str:
    """A loop of two accumulators' MMA branches in nvdisasm's layout: the descriptor base UR22 is
    written before both, and again inside the first."""
    skip = "" if second_branch_entered_from_the_first else "        /*0045*/                   BRA `(.L_x_3) ;\n"
    return (".L_x_1:\n"
            "        /*0000*/                   USGXT.U32 UR22, UR9, 0xe ;\n"
            "        /*0010*/               @P1 BRA `(.L_x_2) ;\n"
            "        /*0020*/                   WARPGROUP.ARRIVE ;\n"
            "        /*0030*/                   UIADD3 UR22, UP0, UR22, 0x2, URZ ;\n"
            "        /*0040*/                   HGMMA.64x64x16.F32.BF16 R56, gdesc[UR20], R56, gsb0 ;\n"
            f"{skip}"
            ".L_x_2:\n"
            "        /*0060*/                   WARPGROUP.ARRIVE ;\n"
            "        /*0070*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR20], R24, gsb0 ;\n"
            ".L_x_3:\n"
            "        /*0080*/               @P0 BRA `(.L_x_1) ;\n")


def test_the_compile_check_finds_mma_descriptors_that_may_come_from_another_accumulators_branch():
    """The shape of ptxas 12.8's G = 2 miscompile: the second branch can be entered after the first
    rewrote UR22, so its MMA may read the first one's descriptor; where the first branch jumps past
    the second (if / else), only the common write reaches it."""
    sys.path.insert(0, os.path.dirname(SCRIPT))
    from gluon_compile_check import entry_loop, stale_descriptors

    body, labels = entry_loop(_loop(second_branch_entered_from_the_first=True))
    assert len(body) == 8
    found = stale_descriptors(body, labels)
    assert len(found) == 1 and "R24, gdesc[UR20]" in found[0] and "UR22" in found[0], found
    body, labels = entry_loop(_loop(second_branch_entered_from_the_first=False))
    assert stale_descriptors(body, labels) == []
