"""Compile the grouped Gluon kernel (sparsify/kernels/grouped_gluon.py: the forward and grad_input) for a
Hopper GPU on a machine without one: Triton's front end, the Gluon layouts and PTX generation run as on the GPU, so mistakes show
before any device time is spent. With Triton's bundled ptxas it also prints registers and spills.

    python benchmarks/gluon_compile_check.py                    # the default configs, sm_90
    python benchmarks/gluon_compile_check.py --configs 64:4:4:8,64:4:6:8:1:2  # B:G:STAGES:num_warps[:WS[:IN_FLIGHT]],... (both products)

Exits 1 if any config fails to compile. The driver is replaced by a stand-in that names the target, so
run it in its own process (tests/test_gluon_compile.py does).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

DEFAULT = "64:1:4:4,64:4:6:8:0:2,32:4:6:8:0:3,128:2:3:8:0:2,16:4:8:8:0:3,64:4:6:8:1:2,64:2:6:8:1:1"  # B:G:STAGES:warps[:WS[:IN_FLIGHT]]


class TargetOnly:
    """What the JIT asks of a driver before launching: the device, the stream and the target."""

    def __init__(self, capability: int):
        self.target = GPUTarget("cuda", capability, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


def compile_config(block: int, group: int, stages: int, warps: int, transpose: bool, ws: bool = False,
                   in_flight: int = 1):
    """The kernel compiled for 4096 -> 14336 at density 0.5 and 8192 tokens, the forward (``transpose``)
    or grad_input, plain or warp-specialized (``ws``) (shapes on the CPU: nothing runs)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from sparsify.kernels import grouped_gluon
    from sparsify.kernels.row_groups import forward_entries, grad_input_entries

    tokens, in_f, out_f, bm = 8192, 4096, 14336, 128
    rows, cols = out_f // block, in_f // block
    k = cols // 2
    col = torch.rand(rows, cols).argsort(dim=1)[:, :k].to(torch.int32)
    entries = (forward_entries if transpose else grad_input_entries)(col, cols, group)
    a = torch.empty(tokens, in_f if transpose else out_f, dtype=torch.bfloat16)
    y = torch.empty(tokens, out_f if transpose else in_f, dtype=torch.bfloat16)
    values = torch.empty(rows, k, block, block, dtype=torch.bfloat16)
    box = gl.NVMMASharedLayout.get_default_for([bm, block], gl.bfloat16)
    square = gl.NVMMASharedLayout.get_default_for([block, block], gl.bfloat16)
    descriptors = (TensorDescriptor.from_tensor(a, [bm, block], box),
                   TensorDescriptor.from_tensor(values.view(rows * k * block, block), [block, block], square),
                   TensorDescriptor.from_tensor(y, [bm, block], box))
    bias = torch.empty(out_f, dtype=torch.bfloat16) if transpose else y
    return grouped_gluon.KERNELS[ws].warmup(
        *descriptors, *entries[:5], bias, tokens, y.shape[1] // block, entries.bounds.shape[0],
        B=block, G=group, BM=bm, STAGES=stages, TRANSPOSE=transpose, HAS_BIAS=transpose, IN_FLIGHT=in_flight,
        num_warps=warps, grid=(1,),
    )


def ptxas_report(kernel, capability: int) -> str:
    ptxas = pathlib.Path(triton.__file__).parent / "backends/nvidia/bin/ptxas"
    if not ptxas.exists():
        return "(no bundled ptxas)"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    done = subprocess.run([str(ptxas), "-v", "--gpu-name", f"sm_{capability}a", f.name, "-o", os.devnull],
                          capture_output=True, text=True)
    os.unlink(f.name)
    lines = [line.split(":", 1)[-1].strip() for line in done.stderr.splitlines() if "registers" in line or "spill" in line or "wgmma" in line]
    return "; ".join(lines) or done.stderr.strip()[-300:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=DEFAULT, help="B:G:STAGES:num_warps[:WS[:IN_FLIGHT]],...")
    parser.add_argument("--capability", type=int, default=90)
    args = parser.parse_args()
    driver.set_active(TargetOnly(args.capability))
    failed = 0
    for item in args.configs.split(","):
        block, group, stages, warps, *rest = (int(v) for v in item.split(":"))
        ws, in_flight = bool(rest and rest[0]), (rest[1] if len(rest) > 1 else 1)
        for product, transpose in (("forward", True), ("grad_input", False)):
            name = f"{product} B={block} G={group} STAGES={stages} warps={warps}{' WS' if ws else ''} in flight {in_flight}"
            try:
                kernel = compile_config(block, group, stages, warps, transpose, ws, in_flight)
            except Exception as error:  # report every config, then fail
                failed += 1
                cause = error.__cause__ if error.__cause__ is not None else error
                print(f"{name}: FAILED {type(cause).__name__}: {str(cause)[-800:]}")
                continue
            print(f"{name}: OK, {kernel.metadata.shared} bytes of shared memory; {ptxas_report(kernel, args.capability)}")
    print(f"triton {triton.__version__}: {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
