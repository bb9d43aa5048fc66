"""Each Block-ELL kernel against the cuBLAS GEMM doing the same product densely (GPU), and the windows
that Nsight Compute profiles.

    python benchmarks/kernel_profile.py                          # times -> results/kernels-<device>-<date>.json
    python benchmarks/kernel_profile.py --blocks 64,128 --ncu    # one launch of each kernel, under ncu
    python benchmarks/kernel_profile.py --parse-ncu raw.csv --labels labels.json --out ncu.json

Products (x [M, in], grad_out g [M, out], W [out, in] Block-ELL with values [R, K, B, B]):
forward y = x W^T (dense: F.linear), grad_input g W (dense: g @ W), grad_values g^T x at the kept
blocks (dense: g^T @ x, the whole [out, in]). Every kernel the launchers can choose between is timed
(``VARIANTS``), each checked against float32 dense math on the same random inputs before it is timed;
speedup = dense time / kernel time, both `do_bench` medians in one process. Metadata kernels (the
column view grad_input walks, the slot table of the masked-dense tiles) are timed alone too.

``--ncu``: after every kernel has run (autotuned, compiled), each one is launched once more inside
a ``cudaProfilerStart`` / ``Stop`` window that opens with a marker kernel (``torch.cuda._sleep``), so
``ncu --profile-from-start off`` profiles exactly those launches and ``--parse-ncu`` can name every
profiled kernel by the window it ran in (labels written to ``--labels``). gpu_first_call.sh runs both.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import os
import pathlib
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench_layer import dense_of, random_topology  # noqa: E402  (benchmarks/ is on sys.path as the script's folder)

import sparsify.ops  # noqa: E402,F401

SHAPES = [(4096, 14336), (14336, 4096)]
BLOCKS = [128, 64, 32, 16]  # the large blocks first: a run cut short has them on both shapes
WARMUP_MS, REP_MS = 25, 100
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}

# route name -> (environment variables of the pre-dispatch launchers, KernelOptions fields); both are set
# so that the script measures the same route before and after the launchers read sparsify.kernels.dispatch
ROUTES = {
    "auto": ({}, {}),
    "gather": ({"SPARSIFY_BLOCK_KERNEL": "gather"}, {"block_kernel": "gather"}),
    "tile": ({"SPARSIFY_BLOCK_KERNEL": "tile"}, {"block_kernel": "tile"}),
    "tma_on": ({"SPARSIFY_TMA": "1"}, {"tma": "on"}),
    "tma_off": ({"SPARSIFY_TMA": "0"}, {"tma": "off"}),
}


@contextlib.contextmanager
def route(name: str):
    env, fields = ROUTES[name]
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        from sparsify.kernels.dispatch import kernel_options
        ctx = kernel_options(**fields)
    except ImportError:  # pragma: no cover - a tree without the dispatch module
        ctx = contextlib.nullcontext()
    try:
        with ctx:
            yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def launchers():
    """The library's Triton launchers (forward, grad_input, grad_values), routed as the ops route them."""
    try:
        from sparsify.kernels.dispatch import triton_kernels
    except ImportError:  # pragma: no cover - a tree whose launchers still live in ops.py
        from sparsify.ops import triton_kernels
    return triton_kernels()


def extra_kernels() -> dict:
    """Kernels built after the launchers' routes were fixed, timed beside them until they earn a route:
    product -> {name: fn(case) -> output}. Missing modules are skipped."""
    extra: dict = {"forward": {}, "grad_input": {}, "grad_values": {}}
    try:
        from sparsify.kernels.grad_input_tma import grad_input_tma, tma_grad_input_fits
        extra["grad_input"]["tma"] = lambda c: (
            grad_input_tma(c.g, c.values, c.col, c.in_f) if tma_grad_input_fits(c.g, c.values) else None)
    except ImportError:
        pass
    try:
        from sparsify.kernels.grad_values_tma import grad_values_tma, tma_grad_values_fits
        extra["grad_values"]["tma"] = lambda c: (
            grad_values_tma(c.g, c.x, c.col, c.block) if tma_grad_values_fits(c.g, c.x, c.block) else None)
    except ImportError:
        pass
    return extra


def variants(block: int) -> dict:
    """product -> route names worth timing at this block size (the default first)."""
    forward = ["auto"] + (["gather", "tile"] if block <= 32 else []) + (["tma_on"] if block == 64 else [])
    forward += ["tma_off"] if block >= 128 else []
    backward = ["auto"] + (["gather", "tile"] if block <= 32 else [])
    return {"forward": forward, "grad_input": backward, "grad_values": backward}


class Case:
    def __init__(self, in_f, out_f, m, block, density, dtype, device="cuda"):
        self.in_f, self.out_f, self.m, self.block = in_f, out_f, m, block
        cols, rows = in_f // block, out_f // block
        self.k = min(cols, max(1, round(cols * density)))
        self.x = torch.randn(m, in_f, device=device, dtype=dtype)
        self.g = torch.randn(m, out_f, device=device, dtype=dtype)
        self.values = torch.randn(rows, self.k, block, block, device=device, dtype=dtype) / (self.k * block) ** 0.5
        self.col = random_topology(rows, cols, self.k, device)
        self.w = dense_of(self.values, self.col, in_f)

    def products(self, kernels) -> dict:
        """product -> (our launcher call, the dense GEMM, the float32 reference)."""
        c = self
        return {
            "forward": (lambda: kernels.forward(c.x, c.values, c.col, None), lambda: F.linear(c.x, c.w),
                        lambda: F.linear(c.x.float(), c.w.float())),
            "grad_input": (lambda: kernels.grad_input(c.g, c.values, c.col, c.in_f), lambda: c.g @ c.w,
                           lambda: c.g.float() @ c.w.float()),
            "grad_values": (lambda: kernels.grad_values(c.g, c.x, c.col, c.block), lambda: c.g.t() @ c.x,
                            lambda: self.blocks_of(c.g.float().t() @ c.x.float())),
        }

    def blocks_of(self, dense: torch.Tensor) -> torch.Tensor:
        """[out, in] -> [R, K, B, B] at the kept blocks."""
        b, rows, cols = self.block, self.out_f // self.block, self.in_f // self.block
        tiles = dense.view(rows, b, cols, b).permute(0, 2, 1, 3)  # [R, C, B, B]
        return torch.gather(tiles, 1, self.col.long()[:, :, None, None].expand(-1, -1, b, b))


def bench(fn) -> float:
    if not torch.cuda.is_available():  # the CPU smoke run (TRITON_INTERPRET=1): one timed call
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    from triton.testing import do_bench
    return do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")


def rel(out, ref) -> float:
    if out is None:
        return float("nan")
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out.float() - ref).norm() / ref.norm()).item()


def metadata_times(case) -> dict:
    out = {}
    try:
        from sparsify.kernels.column_view import column_view
        out["column_view_ms"] = bench(lambda: column_view(case.col, case.in_f // case.block))
    except ImportError:
        pass
    for module in ("sparsify.kernels.tiles", "sparsify.kernels.slot_table", "sparsify.kernels.metadata"):
        try:
            slot_table = __import__(module, fromlist=["slot_table"]).slot_table
        except (ImportError, AttributeError):
            continue
        out["slot_table_ms"] = bench(lambda: slot_table(case.col, case.in_f // case.block))
        break
    return out


def time_case(case, kernels, extra, dtype) -> list[dict]:
    rows = []
    flops = 2 * case.m * case.in_f * case.out_f
    for product, (ours, dense, reference) in case.products(kernels).items():
        ref = reference()
        dense_ms = bench(dense)
        runs = [(name, lambda name=name, ours=ours: _in_route(name, ours)) for name in variants(case.block)[product]]
        runs += [(f"new:{name}", lambda fn=fn: fn(case)) for name, fn in extra[product].items()]
        for name, fn in runs:
            try:
                out = fn()
            except Exception as error:  # noqa: BLE001  (a variant that cannot run here is reported, not fatal)
                rows.append({"product": product, "variant": name, "error": f"{type(error).__name__}: {str(error)[:300]}"})
                continue
            if out is None:
                continue  # the variant does not apply to this case
            err = rel(out, ref)
            ms = bench(fn) if err < TOL[dtype] else None
            rows.append({
                "product": product, "variant": name, "ms": ms, "dense_ms": dense_ms, "rel_err": err,
                "speedup": dense_ms / ms if ms else None, "dense_tflops": flops / dense_ms / 1e9,
                "eff_tflops": flops * case.k / (case.in_f // case.block) / ms / 1e9 if ms else None,
            })
        del ref
    return rows


def _in_route(name, fn):
    with route(name):
        return fn()


def ncu_windows(case, kernels, extra, labels: list, tag: str) -> None:
    """One profiled launch per kernel, each in its own window opened by a marker kernel."""
    for product, (ours, dense, _) in case.products(kernels).items():
        calls = [(f"dense {product}", dense)]
        calls += [(f"{product} {name}", lambda name=name, ours=ours: _in_route(name, ours))
                  for name in variants(case.block)[product]]
        calls += [(f"{product} new:{name}", lambda fn=fn: fn(case)) for name, fn in extra[product].items()]
        for label, fn in calls:
            try:
                if fn() is None and not label.startswith("dense"):
                    continue
                fn()  # autotuned and compiled before the window opens
            except Exception:  # noqa: BLE001
                continue
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
            torch.cuda._sleep(1000)  # the window's marker kernel
            with torch.cuda.nvtx.range(f"{tag} {label}"):
                fn()
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
            labels.append(f"{tag} {label}")


def parse_ncu(csv_path: str, labels_path: str, out_path: str) -> None:
    """ncu --page raw --csv export -> one record per profiled kernel, named by its window."""
    labels = json.loads(pathlib.Path(labels_path).read_text())
    with open(csv_path, newline="") as f:
        lines = [line for line in f if line.startswith('"')]  # ncu prints its own notes before the table
    table = list(csv.reader(lines))
    header, units, body = table[0], table[1], table[2:]
    records, window = [], -1
    for row in body:
        entry = dict(zip(header, row))
        name = entry.get("Kernel Name", "")
        if "sleep" in name or "spin" in name:  # torch.cuda._sleep's kernel opens the next window
            window += 1
            continue
        keep = {k: v for k, v in entry.items() if k in ("Kernel Name", "Grid Size", "Block Size") or "__" in k}
        records.append({"label": labels[window] if 0 <= window < len(labels) else "?", **keep})
    units_of = {k: u for k, u in zip(header, units) if u}
    pathlib.Path(out_path).write_text(json.dumps({"units": units_of, "kernels": records}, indent=1))
    print(f"{len(records)} kernels in {window + 1} windows ({len(labels)} labels) -> {out_path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=None, help="e.g. 4096x14336,14336x4096")
    p.add_argument("--blocks", default=None, help="e.g. 16,32,64,128")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of this script under TRITON_INTERPRET=1")
    p.add_argument("--ncu", action="store_true", help="profiling windows instead of timings")
    p.add_argument("--labels", default="ncu-labels.json")
    p.add_argument("--parse-ncu", metavar="CSV")
    p.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = p.parse_args()
    if args.parse_ncu:
        parse_ncu(args.parse_ncu, args.labels, args.out)
        return
    import triton

    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    blocks = [int(v) for v in args.blocks.split(",")] if args.blocks else BLOCKS
    dtype = getattr(torch, args.dtype)
    kernels, extra = launchers(), extra_kernels()
    torch.manual_seed(0)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    today = datetime.date.today().isoformat()
    record = {"device": device, "date": today, "torch": torch.__version__, "triton": triton.__version__,
              "cuda": torch.version.cuda, "dtype": args.dtype, "M": args.tokens, "density": args.density,
              "do_bench": {"warmup_ms": WARMUP_MS, "rep_ms": REP_MS, "return_mode": "median"}, "rows": []}
    out = pathlib.Path(args.out)
    path = out / f"kernels-{device.replace(' ', '_')}-{today}.json" if out.suffix != ".json" else out
    path.parent.mkdir(parents=True, exist_ok=True)
    labels: list = []
    for block in blocks:
        for in_f, out_f in shapes:
            case = Case(in_f, out_f, args.tokens, block, args.density, dtype, args.device)
            base = {"in": in_f, "out": out_f, "M": args.tokens, "B": block, "K": case.k, "density": case.k * block / in_f}
            if args.ncu:
                ncu_windows(case, kernels, extra, labels, f"{in_f}->{out_f} B={block}")
                pathlib.Path(args.labels).write_text(json.dumps(labels))
                continue
            for row in time_case(case, kernels, extra, dtype):
                record["rows"].append({**base, **row})
                ms = f"{row['ms']:.3f} ms ({row['speedup']:.2f}x)" if row.get("ms") else row.get("error", "not timed")
                print(f"{in_f}->{out_f} B={block} {row['product']:<11} {row['variant']:<10} {ms} "
                      f"dense {row.get('dense_ms', float('nan')):.3f} err {row.get('rel_err', float('nan')):.1e}", flush=True)
            record["rows"].append({**base, "product": "metadata", **metadata_times(case)})
            path.write_text(json.dumps(record, indent=1))  # after every case: a cut-off run keeps what it measured
            del case
    if not args.ncu:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
