"""Host-side cost of one eager Block-ELL layer call (forward + backward) against nn.Linear's, where the GPU
work is tiny (decode-sized inputs), so what is timed is the Python and launch path.

    PYTHONPATH=. python benchmarks/host_overhead.py [--out DIR]          # CUDA: the table + a JSON file
    PYTHONPATH=. python benchmarks/host_overhead.py --device cpu         # dry run: tiny shapes, the reference
    PYTHONPATH=. python benchmarks/host_overhead.py --profile            # where the host time goes (cProfile)
    PYTHONPATH=/tmp/before python benchmarks/host_overhead.py --tag before  # an older tree of sparsify/

Per configuration (in->out, B, M tokens, stats probe on / off) the sparse layer's and nn.Linear's
fwd+bwd calls are timed in alternation (sparse loop, dense loop, ``--repeats`` times, ``--calls`` calls
a loop), so drift of a noisy host hits both alike. Each loop reads the host clock twice: after the last
launch (``host``: the host's own time per call, no synchronize in the loop) and after one
``torch.cuda.synchronize`` (``wall``: whichever of host and GPU is slower). Reported: median and min over
the repeats, and the ratios sparse / dense of the medians. At M = 16 the kernels take ~10 us each, so
host = wall there unless the launch queue fills. The acceptance ratio is ``host ratio`` (at most 1.5).
The whole run stops starting new configurations after ``--budget-s`` seconds (compilation included).
``--cuda-graphs`` adds the path that makes host time irrelevant: each layer compiled with
``mode="reduce-overhead"`` (``compile_repeated_layers`` for the sparse one), its fwd+bwd replayed as CUDA
graphs, timed the same way (``sparse_graphs_us`` / ``dense_graphs_us``, and the sparse graphs against eager
nn.Linear: ``graphs_vs_dense_eager``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import statistics
import time

import torch
from tabulate import tabulate

from sparsify import BlockSparseLinear, compile_repeated_layers, kernel_options

# (in, out, M): the decode-sized calls the acceptance is about, and one larger M that compiles no
# autotuned configs (below common.AUTOTUNE_MIN_MACS) so that the run stays short.
CUDA_CASES = [(640, 2560, 16), (4096, 14336, 16), (640, 2560, 2048)]
CPU_CASES = [(64, 128, 4), (128, 256, 64)]  # the dry run: the reference backend, seconds in all


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_loop(fn, calls: int, device: torch.device) -> tuple[float, float]:
    """(host, wall) microseconds per call of ``calls`` back-to-back calls of ``fn``."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    launched = time.perf_counter()
    _sync(device)
    done = time.perf_counter()
    return (launched - start) / calls * 1e6, (done - start) / calls * 1e6


def compare(fns: dict, calls: int, repeats: int, device: torch.device) -> dict:
    """Per name in ``fns``: median and min of host and wall time per call, loops in alternation."""
    for fn in fns.values():  # warm-up: compilation, autotuning, the allocator's caches
        for _ in range(10):
            fn()
    _sync(device)
    samples = {name: ([], []) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            host, wall = timed_loop(fn, calls, device)
            samples[name][0].append(host)
            samples[name][1].append(wall)
    return {
        name: {"host_median": statistics.median(h), "host_min": min(h),
               "wall_median": statistics.median(w), "wall_min": min(w)}
        for name, (h, w) in samples.items()
    }


def count_kernels(fn, device: torch.device, calls: int = 5) -> float | None:
    """GPU kernels launched per call of ``fn`` (torch.profiler), None off CUDA."""
    if device.type != "cuda":
        return None
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        _sync(device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(kernels) / calls


class _Stack(torch.nn.Module):
    """One layer in a ModuleList, the shape compile_repeated_layers looks for."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layers = torch.nn.ModuleList([layer])

    def forward(self, x):
        return self.layers[0](x)


def graphed(layer: torch.nn.Module, x, grad):
    """fwd+bwd of ``layer`` compiled with mode="reduce-overhead" (CUDA graphs), one step a call."""
    stack = _Stack(layer)
    if isinstance(layer, BlockSparseLinear):
        compile_repeated_layers(stack)
    else:
        stack.layers[0].compile(mode="reduce-overhead")

    def call():
        torch.compiler.cudagraph_mark_step_begin()
        stack(x).backward(grad)

    return call


def measure(in_f: int, out_f: int, tokens: int, block: int, probe: bool, dtype, device, args) -> dict:
    sparse = BlockSparseLinear(in_f, out_f, block_size=block, density=0.5, device=device, dtype=dtype)
    dense = torch.nn.Linear(in_f, out_f, device=device, dtype=dtype)
    sparse.stats_probe.requires_grad_(probe)
    x = torch.randn(tokens, in_f, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, out_f, device=device, dtype=dtype)
    fns = {"sparse": lambda: sparse(x).backward(grad), "dense": lambda: dense(x).backward(grad)}
    graphs = args.cuda_graphs and device.type == "cuda"
    if graphs:
        fns["sparse_graphs"] = graphed(sparse, x, grad)
        fns["dense_graphs"] = graphed(dense, x, grad)
    times = compare(fns, args.calls, args.repeats, device)
    s, d = times["sparse"], times["dense"]
    extra = {}
    if graphs:
        sg, dg = times["sparse_graphs"], times["dense_graphs"]
        extra = {"sparse_graphs_us": round(sg["wall_median"], 1), "dense_graphs_us": round(dg["wall_median"], 1),
                 "graphs_ratio": round(sg["wall_median"] / dg["wall_median"], 2),
                 "graphs_vs_dense_eager": round(sg["wall_median"] / d["wall_median"], 2)}
    return {**extra,
        "in": in_f, "out": out_f, "M": tokens, "B": block, "density": 0.5, "probe": probe,
        "sparse_host_us": round(s["host_median"], 1), "sparse_host_min_us": round(s["host_min"], 1),
        "dense_host_us": round(d["host_median"], 1), "dense_host_min_us": round(d["host_min"], 1),
        "host_ratio": round(s["host_median"] / d["host_median"], 2),
        "host_ratio_min": round(s["host_min"] / d["host_min"], 2),
        "sparse_wall_us": round(s["wall_median"], 1), "dense_wall_us": round(d["wall_median"], 1),
        "wall_ratio": round(s["wall_median"] / d["wall_median"], 2),
        "sparse_kernels": count_kernels(fns["sparse"], device), "dense_kernels": count_kernels(fns["dense"], device),
    }


def profile(device: torch.device, dtype, calls: int = 200) -> None:
    """Print where a sparse fwd+bwd call spends its host time (cProfile), and the kernels it launches."""
    import cProfile
    import pstats

    in_f, out_f, tokens = (640, 2560, 16) if device.type == "cuda" else (64, 128, 4)
    sparse = BlockSparseLinear(in_f, out_f, block_size=16, density=0.5, device=device, dtype=dtype)
    sparse.stats_probe.requires_grad_(True)
    x = torch.randn(tokens, in_f, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, out_f, device=device, dtype=dtype)

    def fn():
        sparse(x).backward(grad)

    compare({"sparse": fn}, 20, 1, device)
    print(f"GPU kernels per fwd+bwd call: {count_kernels(fn, device)}")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    _sync(device)
    profiler.disable()
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(40)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--calls", type=int, default=None, help="calls per timed loop (200 on CUDA)")
    parser.add_argument("--repeats", type=int, default=7, help="timed loops per layer (median and min)")
    parser.add_argument("--budget-s", type=float, default=65.0, help="start no configuration after this")
    parser.add_argument("--tag", default="", help="suffix of the result file's name (e.g. before / after)")
    parser.add_argument("--profile", action="store_true", help="print a cProfile breakdown instead of timing")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="also time both layers compiled with mode='reduce-overhead' (CUDA graphs; M <= 64 only)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.profile:
        profile(device, dtype)
        return
    if args.calls is None:
        args.calls = 200 if device.type == "cuda" else 20
    cases = CUDA_CASES if device.type == "cuda" else CPU_CASES
    start = time.perf_counter()
    rows, skipped = [], []
    context = kernel_options() if device.type == "cuda" else kernel_options(backend="reference")
    with context:
        for in_f, out_f, tokens in cases:
            if args.cuda_graphs and tokens > 64:
                continue  # the graphs answer the decode-sized calls; a compile per configuration costs budget
            for block in (16, 64):
                for probe in (False, True):
                    config = {"in": in_f, "out": out_f, "M": tokens, "B": block, "probe": probe}
                    if time.perf_counter() - start > args.budget_s:
                        skipped.append(config)
                        continue
                    rows.append(measure(in_f, out_f, tokens, block, probe, dtype, device, args))
                    print(rows[-1], flush=True)
    elapsed = time.perf_counter() - start
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or 'unknown'})"
    report = {
        "device": name, **versions,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dtype": str(dtype).replace("torch.", ""),
        "method": (
            f"eager fwd+bwd, sparse and nn.Linear loops in alternation, {args.repeats} loops of {args.calls} calls "
            "each; host = host clock after the last launch, wall = after one synchronize; medians and mins over "
            "the loops; ratio = sparse / dense"
        ),
        "tag": args.tag, "elapsed_s": round(elapsed, 1), "skipped_over_budget": skipped, "measurements": rows,
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = name.replace(" ", "_").split("_(")[0] if device.type == "cuda" else "cpu-dry-run"
    tag = f"-{args.tag}" if args.tag else ""
    path = out / f"host-overhead-{slug}-{datetime.date.today().isoformat()}{tag}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    columns = ["in", "out", "M", "B", "probe", "sparse_host_us", "sparse_host_min_us", "dense_host_us",
               "host_ratio", "host_ratio_min", "wall_ratio", "sparse_kernels", "dense_kernels"]
    if args.cuda_graphs:
        columns += ["sparse_graphs_us", "dense_graphs_us", "graphs_ratio", "graphs_vs_dense_eager"]
    print(tabulate([[row.get(c) for c in columns] for row in rows], headers=columns, tablefmt="github"))
    print(f"{elapsed:.1f} s; wrote {path}" + (f"; skipped over budget: {skipped}" if skipped else ""))


if __name__ == "__main__":
    main()
