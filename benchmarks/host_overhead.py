"""Host-side cost of one Block-ELL layer call on CUDA, where the GPU work is tiny (decode-sized inputs).

    python benchmarks/host_overhead.py [--out DIR]
    python benchmarks/host_overhead.py --profile      # where the host time goes (cProfile + kernel count)

Times back-to-back eager calls with a host clock around many calls and one synchronize (so the
number is whichever of host or GPU is slower), forward and forward+backward, for the sparse layer
(its eager route, sparsify/functional.py, with the stats probe on as under the TopologyOptimizer),
the registered op called directly (the route torch.compile sees), and dense nn.Linear. Writes host_overhead.json (device, versions) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import time

import torch
import triton
from tabulate import tabulate

from sparsify import BlockSparseLinear


def per_call_us(fn, calls: int = 300) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def profile(calls: int = 200) -> None:
    """Print where a sparse fwd+bwd call spends its host time, and how many kernels it launches."""
    import cProfile
    import pstats

    sparse = BlockSparseLinear(512, 2048, block_size=64, density=0.5, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(16, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(16, 2048, device="cuda", dtype=torch.bfloat16)
    for name, fn in (("forward", lambda: sparse(x)), ("forward+backward", lambda: sparse(x).backward(grad))):
        per_call_us(fn, calls=20)
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        gpu_us = sum(e.time_range.elapsed_us() for e in kernels) / 20
        print(f"\n== {name}: {len(kernels) / 20:.0f} GPU kernels per call, {gpu_us:.1f} us of GPU time per call: "
              f"{sorted({e.name[:60] for e in kernels})}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        profiler.disable()
        stats = pstats.Stats(profiler)
        stats.sort_stats("tottime").print_stats(20)
        stats.sort_stats("cumulative").print_stats(30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--profile", action="store_true", help="print a cProfile breakdown instead of timing")
    args = parser.parse_args()
    if args.profile:
        profile()
        return
    rows = []
    for in_f, out_f, tokens in ((512, 2048, 16), (4096, 14336, 16), (512, 2048, 2048)):
        sparse = BlockSparseLinear(in_f, out_f, block_size=64, density=0.5, device="cuda", dtype=torch.bfloat16)
        dense = torch.nn.Linear(in_f, out_f, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(tokens, out_f, device="cuda", dtype=torch.bfloat16)
        probe = sparse.stats_probe.requires_grad_(True)

        def op_route():  # the registered op, as torch.compile / export see it (the route of earlier runs)
            return torch.ops.sparsify.block_ell_linear(x, sparse.values, sparse.col_indices, sparse.bias, probe)

        with torch.no_grad():
            fwd_sparse, fwd_dense = per_call_us(lambda: sparse(x)), per_call_us(lambda: dense(x))
            fwd_op = per_call_us(op_route)
        both_sparse = per_call_us(lambda: sparse(x).backward(grad))
        both_op = per_call_us(lambda: op_route().backward(grad))
        both_dense = per_call_us(lambda: dense(x).backward(grad))
        rows.append({
            "in->out": f"{in_f}->{out_f}", "M": tokens, "B": 64,
            "sparse fwd us": round(fwd_sparse, 1), "op route fwd us": round(fwd_op, 1), "dense fwd us": round(fwd_dense, 1),
            "sparse fwd+bwd us": round(both_sparse, 1), "op route fwd+bwd us": round(both_op, 1),
            "dense fwd+bwd us": round(both_dense, 1),
        })
    report = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "date": datetime.date.today().isoformat(), "method": "eager calls back to back, host clock, one sync; stats probe on", "measurements": rows,
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "host_overhead.json").write_text(json.dumps(report, indent=2))
    print(tabulate(rows, headers="keys", tablefmt="github"))


if __name__ == "__main__":
    main()
