"""Host-side cost of one Block-ELL layer call on CUDA, where the GPU work is tiny (decode-sized inputs).

    python benchmarks/host_overhead.py [--out DIR]

Times back-to-back eager calls with a host clock around many calls and one synchronize (so the
number is whichever of host or GPU is slower), for the sparse op and for dense F.linear, forward
and forward+backward. Writes host_overhead.json (device, versions) and prints a table.
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    rows = []
    for in_f, out_f, tokens in ((512, 2048, 16), (4096, 14336, 16), (512, 2048, 2048)):
        sparse = BlockSparseLinear(in_f, out_f, block_size=64, density=0.5, device="cuda", dtype=torch.bfloat16)
        dense = torch.nn.Linear(in_f, out_f, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(tokens, out_f, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            fwd_sparse, fwd_dense = per_call_us(lambda: sparse(x)), per_call_us(lambda: dense(x))
        both_sparse = per_call_us(lambda: sparse(x).backward(grad))
        both_dense = per_call_us(lambda: dense(x).backward(grad))
        rows.append({
            "in->out": f"{in_f}->{out_f}", "M": tokens, "B": 64,
            "sparse fwd us": round(fwd_sparse, 1), "dense fwd us": round(fwd_dense, 1),
            "sparse fwd+bwd us": round(both_sparse, 1), "dense fwd+bwd us": round(both_dense, 1),
        })
    report = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "date": datetime.date.today().isoformat(), "method": "eager calls back to back, host clock, one sync", "measurements": rows,
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "host_overhead.json").write_text(json.dumps(report, indent=2))
    print(tabulate(rows, headers="keys", tablefmt="github"))


if __name__ == "__main__":
    main()
