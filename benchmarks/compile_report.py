"""What ptxas makes of every Triton kernel for Hopper, without a GPU: registers, spills, shared memory,
and whether the PTX holds wgmma and bulk tensor copies, per autotune config and block size.

    python benchmarks/compile_report.py [--blocks 64,128] [--out results/compile-sm90.json]

Compiles each kernel's configs for sm_90 (``triton.compile`` with a GPUTarget; ptxas ships with Triton)
at bf16, no bias, no split. Kernels are found by name in whichever module of sparsify.kernels defines
them (the file layout may change; the kernel names are what this report follows).
"""

from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import pkgutil
import re
import subprocess
import sys
from types import SimpleNamespace

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

INDEX_POINTERS = ("col_ptr", "slots_ptr", "start_ptr", "slot_ptr", "table_ptr", "count_ptr")
# integer arguments that are multiples of 16 in the benchmark shapes: a launch specializes on that (as on
# 16-byte aligned pointers), which lets the compiler vectorize; the report must assume what launches see
DIVISIBLE_INTS = ("M_BUCKET", "N_OUT", "IN_F", "N", "KD")
KERNELS = {  # kernel name -> (constexpr flags, block sizes it serves)
    "_forward_kernel": ({"HAS_BIAS": False, "PARTIAL": False, "FUSED": False, "X_BOXES": False}, (16, 32, 64, 128)),
    "_forward_tma_kernel": ({"HAS_BIAS": False}, (64, 128)),
    "_forward_tma_persistent_kernel": ({"HAS_BIAS": False}, (64, 128)),
    "_forward_tma_ws_kernel": ({"HAS_BIAS": False}, (64, 128)),  # *_ws_kernel: only its WS configs are compiled
    "_grad_input_tma_ws_kernel": ({}, (64, 128)),
    "_grad_values_tma_ws_kernel": ({}, (64, 128)),
    "_tile_kernel": ({"HAS_BIAS": False, "W_ROWS_ARE_KD": False}, (16, 32)),
    "_grad_input_kernel": ({}, (16, 32, 64, 128)),
    "_grad_input_tma_kernel": ({}, (64, 128)),
    "_grad_values_kernel": ({"PARTIAL": False}, (16, 32, 64, 128)),
    "_grad_values_tma_kernel": ({}, (64, 128)),
    "_tile_grad_values_kernel": ({"PARTIAL": False}, (16, 32)),
}


def find_kernels() -> dict:
    import sparsify.kernels as package

    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"sparsify.kernels.{info.name}")
        for name in KERNELS:
            if hasattr(module, name) and name not in found:
                found[name] = getattr(module, name)
    return found


def signature(jit, meta: dict, descriptor_shapes: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attributes) as a launch with 16-byte aligned tensors and the benchmark
    shapes would specialize them."""
    sig, const, attrs = {}, {}, {}
    for index, p in enumerate(jit.params):
        if (p.name.endswith("_ptr") or p.name in DIVISIBLE_INTS) and not p.is_constexpr:
            attrs[(index,)] = [["tt.divisibility", 16]]
    for p in jit.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            const[p.name] = meta.get(p.name, False)
        elif p.name.endswith("_desc"):
            sig[p.name] = f"tensordesc<bf16[{', '.join(map(str, descriptor_shapes[p.name]))}]>"
        elif p.name.endswith("_ptr"):
            sig[p.name] = "*i32" if p.name in INDEX_POINTERS else "*bf16"
        else:
            sig[p.name] = "i32"
    return sig, const, attrs


def resources(kernel) -> dict:
    ptx = kernel.asm["ptx"]
    cubin = pathlib.Path("/tmp/compile_report.cubin")
    cubin.write_bytes(kernel.asm["cubin"])
    tool = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    usage = subprocess.run([str(tool), "--dump-resource-usage", str(cubin)], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    local = re.search(r"LOCAL:(\d+)", usage)
    return {
        "registers": int(regs.group(1)) if regs else None, "local_bytes": int(local.group(1)) if local else None,
        "shared_bytes": kernel.metadata.shared, "wgmma": ptx.count("wgmma.mma_async"),
        "bulk_tensor_copies": ptx.count("cp.async.bulk.tensor"), "cp_async": ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
        "mma_sync": ptx.count("mma.sync"),
        "global_loads": sorted(set(re.findall(r"\bld\.global[\w.]*", ptx))),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", default="16,64,128")
    p.add_argument("--kernels", default=None, help="comma-separated kernel names (default: all found)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    blocks = [int(b) for b in args.blocks.split(",")]
    wanted = set(args.kernels.split(",")) if args.kernels else None
    rows = []
    for name, tuner in find_kernels().items():
        if wanted and name not in wanted:
            continue
        flags, served = KERNELS[name]
        jit = tuner.fn
        while not isinstance(jit, triton.runtime.JITFunction):
            jit = jit.fn
        for block in (b for b in blocks if b in served):
            for config in tuner.configs:
                if name.endswith("_ws_kernel") and not config.kwargs.get("WS"):
                    continue  # compiled under the plain kernel's name
                meta = {"B": block, "PRECISION": "ieee", "UPCAST": False, **flags, **config.kwargs}
                shapes = {}
                if config.pre_hook is not None:  # TMA kernels: the pre-hook names each descriptor's block
                    nargs = {p.name: SimpleNamespace() for p in jit.params if p.name.endswith("_desc")}
                    config.pre_hook({**nargs, **meta})
                    shapes = {k: v.block_shape for k, v in nargs.items()}
                if any(isinstance(v, int) and v > 8 * max(block, 32) for k, v in config.kwargs.items() if k.startswith(("KS", "TS", "GS"))):
                    continue
                row = {"kernel": name, "B": block, **config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
                try:
                    sig, const, attrs = signature(jit, meta, shapes)
                    compiled = triton.compile(ASTSource(jit, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
                    row.update(resources(compiled))
                except Exception as error:  # noqa: BLE001  (a config this block size cannot take)
                    row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps({"target": "sm_90", "triton": triton.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
