"""Block-ELL layer benchmark (GPU): our Triton kernels against dense F.linear and PyTorch's BSR.

    python benchmarks/bench_layer.py                 # every shape, M, block size and density
    python benchmarks/bench_layer.py --quick         # density 0.5 only
    python benchmarks/bench_layer.py --out DIR       # where <device>-<date>.json goes

For each (shape in->out, tokens M, block size B, density): forward and forward+backward (grads of x
and the weight, no bias) of ours and of dense F.linear, and the forward of PyTorch's BSR kernel
(torch.sparse BSR weight through F.linear; it has no backward for a sparse weight), all timed in the
same run with triton.testing.do_bench medians. Speedup = dense time / our time, dense timed on the same
inputs right before and right after each row's sparse timings (their mean; both kept in the row). Weight memory counts
the trained state: values + their gradient + two Adam moments (+ col_indices) against the same four
dense [out, in] tensors. Inputs are random (never zeros); the topology is uniformly random.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import sys

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from timing import cuda_graph_of  # benchmarks/timing.py (this script's folder is on sys.path)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import sparsify.ops  # noqa: E402,F401  (registers torch.ops.sparsify.*)
from sparsify.kernels.dispatch import options as kernel_options_in_force  # noqa: E402

SHAPES = [(640, 2560), (2560, 640), (4096, 14336), (14336, 4096)]
TOKENS = [16, 8192]
BLOCKS = [16, 32, 64, 128]
DENSITIES = [0.25, 0.5, 0.75]
WARMUP_MS, REP_MS = 10, 40


def bench(fn) -> float:
    return do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")


GRAPH_COPIES = 4  # weight copies a CUDA-graph decode timing rotates through (set by --graph-copies)


def graph_bench(fns, calls: int = 20) -> float:
    """Per-call time of `calls` back-to-back calls captured in one CUDA graph (no host overhead):
    what a decode loop under CUDA graphs (torch.compile mode="reduce-overhead") sees. The calls
    rotate through `fns` (one per weight copy) so that weights do not stay in L2 between calls."""
    return bench(cuda_graph_of(fns, calls).replay) / calls


def random_topology(rows: int, cols: int, k: int, device) -> torch.Tensor:
    return torch.rand(rows, cols, device=device).argsort(dim=1)[:, :k].sort(dim=1).values.to(torch.int32)


def dense_of(values: torch.Tensor, col: torch.Tensor, in_features: int) -> torch.Tensor:
    rows, k, b, _ = values.shape
    w = torch.zeros(rows, in_features // b, b, b, dtype=values.dtype, device=values.device)
    w.scatter_(1, col.long()[:, :, None, None].expand(-1, -1, b, b), values)
    return w.permute(0, 2, 1, 3).reshape(rows * b, in_features)


def time_dense(x, w, g):
    fwd = bench(lambda: F.linear(x, w))
    xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()

    def step():
        y = F.linear(xg, wg)
        torch.autograd.grad(y, (xg, wg), g)

    graph_fwd = None
    if x.shape[0] <= 64:
        copies = [w] + [w.clone() for _ in range(GRAPH_COPIES - 1)]
        graph_fwd = graph_bench([lambda w=w: F.linear(x, w) for w in copies])
        del copies
    return fwd, bench(step), graph_fwd


def with_options(fn, **fields):
    with sparsify.kernel_options(**fields):
        return fn()


def time_variants(x, values, col, g, m, block, density) -> dict:
    """The kernels the launcher can choose between, timed side by side (large M only)."""
    out = {}
    if m < 256:
        return out
    # each variant alone: the grouped kernels off unless timed themselves (they come first in the routing)
    variants = {"dense_weight": dict(block_kernel="dense", grouped="off")}  # not "dense": that is cuBLAS's field
    if block <= 64:
        variants.update(gather=dict(block_kernel="gather", grouped="off"), tile=dict(block_kernel="tile", grouped="off"),
                        grouped=dict(block_kernel="gather", grouped="on"))
    if block >= 64:  # every TMA kernel tuned among its warp-specialized configs too (forward and backward)
        variants.update(tma_ws=dict(block_kernel="gather", grouped="off", tma="ws"))
    for kind, fields in variants.items():
        try:
            out[f"{kind}_fwd_ms"], out[f"{kind}_fwdbwd_ms"] = with_options(lambda: time_ours(x, values, col, g), **fields)
        except Exception as error:  # noqa: BLE001  (a variant this machine cannot run: say so, time the rest)
            out[f"{kind}_error"] = f"{type(error).__name__}: {str(error)[:200]}"
    if block >= 64:
        def tma():
            return bench(lambda: torch.ops.sparsify.block_ell_linear(x, values, col))

        for kind, choice in (("tma", "on"), ("tma_persistent", "persistent")):
            try:
                out[f"{kind}_fwd_ms"] = with_options(tma, tma=choice, grouped="off", block_kernel="gather")
            except Exception as error:  # noqa: BLE001
                out[f"{kind}_error"] = f"{type(error).__name__}: {str(error)[:200]}"
    return out


def time_ours(x, values, col, g):
    op = torch.ops.sparsify.block_ell_linear
    fwd = bench(lambda: op(x, values, col))
    xg, vg = x.detach().requires_grad_(), values.detach().requires_grad_()

    def step():
        y = op(xg, vg, col)
        torch.autograd.grad(y, (xg, vg), g)

    return fwd, bench(step)


def time_bsr(x, w_dense, block):
    try:
        w_bsr = w_dense.to_sparse_bsr((block, block))
        F.linear(x, w_bsr)
        return bench(lambda: F.linear(x, w_bsr)), None
    except Exception as error:  # noqa: BLE001  (report, don't stop the run)
        return None, f"{type(error).__name__}: {str(error)[:120]}"


def run_case(in_f, out_f, m, block, density, dtype, with_bsr):
    """One row. Dense (F.linear on a dense weight of the same shape, the same inputs) is timed right
    before the sparse timings and again right after them: the ratios use the mean of the two, so a clock
    that drifts over the seconds between them (each do_bench flushes L2 and runs 40 ms) shifts both sides
    alike; both timings are kept (``dense_*_ms_before`` / ``_after``) to show how much it drifted."""
    device = "cuda"
    rows, cols = out_f // block, in_f // block
    k = min(cols, max(1, round(cols * density)))
    x = torch.randn(m, in_f, device=device, dtype=dtype)
    g = torch.randn(m, out_f, device=device, dtype=dtype)
    values = torch.randn(rows, k, block, block, device=device, dtype=dtype) / (k * block) ** 0.5
    col = random_topology(rows, cols, k, device)
    w = torch.randn(out_f, in_f, device=device, dtype=dtype) / in_f**0.5
    dense_before = time_dense(x, w, g)
    fwd, fwdbwd = time_ours(x, values, col, g)
    graph_fwd = graph_fwd_dense = None
    if m <= 64:  # decode: host overhead dominates plain calls; time the kernels under a CUDA graph too
        copies = [values] + [values.clone() for _ in range(GRAPH_COPIES - 1)]
        graph_fwd = graph_bench([lambda v=v: torch.ops.sparsify.block_ell_linear(x, v, col) for v in copies])
        del copies
    variants = time_variants(x, values, col, g, m, block, density) if density == 0.5 else {}
    kernels = sparsify.ops.triton_kernels()
    gi = bench(lambda: kernels.grad_input(g, values, col, in_f))
    gv = bench(lambda: kernels.grad_values(g, x, col, block))
    dense_after = time_dense(x, w, g)
    del w
    d_fwd, d_fwdbwd = ((before + after) / 2 for before, after in zip(dense_before[:2], dense_after[:2]))
    if graph_fwd is not None:
        graph_fwd_dense = (dense_before[2] + dense_after[2]) / 2
    bsr = err = None
    if with_bsr:
        bsr, err = time_bsr(x, dense_of(values, col, in_f), block)
    elem = values.element_size()
    sparse_bytes = 4 * values.numel() * elem + col.numel() * 4
    dense_bytes = 4 * out_f * in_f * elem
    flops = 2 * m * in_f * out_f
    return {
        "in": in_f,
        "out": out_f,
        "M": m,
        "B": block,
        "density": k / cols,
        "K": k,
        "dense_fwd_ms": d_fwd,
        "dense_fwdbwd_ms": d_fwdbwd,
        "dense_fwd_ms_before": dense_before[0],
        "dense_fwd_ms_after": dense_after[0],
        "dense_fwdbwd_ms_before": dense_before[1],
        "dense_fwdbwd_ms_after": dense_after[1],
        "dense_fwd_tflops": flops / d_fwd / 1e9,
        "ours_fwd_ms": fwd,
        "ours_fwdbwd_ms": fwdbwd,
        "ours_grad_input_ms": gi,
        "ours_grad_values_ms": gv,
        "graph_dense_fwd_ms": graph_fwd_dense,
        "graph_ours_fwd_ms": graph_fwd,
        "graph_speedup_fwd": graph_fwd_dense / graph_fwd if graph_fwd else None,
        "bsr_fwd_ms": bsr,
        "bsr_error": err,
        "speedup_fwd": d_fwd / fwd,
        "speedup_fwdbwd": d_fwdbwd / fwdbwd,
        "bsr_speedup_fwd": d_fwd / bsr if bsr else None,
        "ours_fwd_eff_tflops": flops * k / cols / fwd / 1e9,
        **variants,
        "weight_state_mib": sparse_bytes / 2**20,
        "dense_weight_state_mib": dense_bytes / 2**20,
    }


def chosen_configs() -> dict:
    """What the autotuner picked per key, for the notes."""
    from sparsify.kernels import forward, forward_tma, grad_input, grad_input_tma, grad_values, grad_values_tma, tiles

    picked = {}
    for name, kernel in (
        ("forward", forward._forward_kernel),
        ("forward_tma", forward_tma._forward_tma_kernel),
        ("forward_tma (tma=ws)", forward_tma._forward_tma_ws_kernel),
        ("grad_input_tma", grad_input_tma._grad_input_tma_kernel),
        ("grad_input_tma (tma=ws)", grad_input_tma._grad_input_tma_ws_kernel),
        ("grad_values_tma", grad_values_tma._grad_values_tma_kernel),
        ("grad_values_tma (tma=ws)", grad_values_tma._grad_values_tma_ws_kernel),
        ("tile (forward, grad_input)", tiles._tile_kernel),
        ("grad_input", grad_input._grad_input_kernel),
        ("grad_values", grad_values._grad_values_kernel),
        ("tile grad_values", grad_values._tile_grad_values_kernel),
    ):
        picked[name] = {str(key): str(config) for key, config in getattr(kernel, "cache", {}).items()}
    return picked


def save(rows: list, args) -> tuple[pathlib.Path, dict]:
    device = torch.cuda.get_device_name()
    today = datetime.date.today().isoformat()
    result = {
        "device": device,
        "date": today,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "dtype": args.dtype,
        "do_bench": {"warmup_ms": WARMUP_MS, "rep_ms": REP_MS, "return_mode": "median"},
        "graph_weight_copies": GRAPH_COPIES,
        "kernel_options": dataclasses.asdict(kernel_options_in_force()),
        "rows": rows,
        "autotuned": chosen_configs(),
    }
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    grouped = kernel_options_in_force().grouped
    suffix = "" if grouped == "auto" else f"-grouped-{grouped}"  # never merged into the default routing's file
    path = out_dir / f"{device.replace(' ', '_')}-{today}{suffix}.json"
    if path.exists():  # keep rows of earlier runs today that this run did not measure again
        ident = lambda r: (r["in"], r["out"], r["M"], r["B"], r["K"])  # noqa: E731
        mine = {ident(r) for r in rows}
        earlier = [r for r in json.loads(path.read_text())["rows"] if ident(r) not in mine]
        result["rows"] = earlier + rows
    path.write_text(json.dumps(result, indent=1))
    return path, result


def main() -> None:
    global GRAPH_COPIES
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="density 0.5 only")
    parser.add_argument("--shapes", default=None, help="e.g. 4096x14336,14336x4096")
    parser.add_argument("--tokens", default=None, help="e.g. 16,8192")
    parser.add_argument("--blocks", default=None, help="e.g. 16,32,64,128")
    parser.add_argument("--densities", default=None, help="e.g. 0.25,0.5,0.75")
    parser.add_argument("--bsr-densities", default="0.5", help="densities at which PyTorch BSR is timed too")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--graph-copies", type=int, default=GRAPH_COPIES,
                        help="weight copies rotated in CUDA-graph decode timings (1 = replay one copy, L2-warm)")
    parser.add_argument("--grouped", choices=("auto", "off", "on", "ws"), default="auto",
                        help="kernel option grouped: the grouped Gluon forward and grad_input (Hopper; auto: "
                             "where measured faster, dispatch.GROUPED_DESIGNS)")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = parser.parse_args()
    sparsify.set_kernel_options(grouped=args.grouped)

    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    tokens = [int(v) for v in args.tokens.split(",")] if args.tokens else TOKENS
    blocks = [int(v) for v in args.blocks.split(",")] if args.blocks else BLOCKS
    densities = [float(v) for v in args.densities.split(",")] if args.densities else ([0.5] if args.quick else DENSITIES)
    bsr_densities = {float(v) for v in args.bsr_densities.split(",") if v}
    dtype = getattr(torch, args.dtype)
    GRAPH_COPIES = max(1, args.graph_copies)
    torch.manual_seed(0)

    rows = []
    for in_f, out_f in shapes:
        for m in tokens:
            for block in blocks:
                for density in densities:
                    row = run_case(in_f, out_f, m, block, density, dtype, density in bsr_densities)
                    rows.append(row)
                    print(
                        f"{in_f}->{out_f} M={m} B={block} d={row['density']:.2f}: fwd {row['speedup_fwd']:.2f}x "
                        f"fwd+bwd {row['speedup_fwdbwd']:.2f}x bsr {row['bsr_speedup_fwd'] or float('nan'):.2f}x "
                        f"graph fwd {row['graph_speedup_fwd'] or float('nan'):.2f}x "
                        + " ".join(f"{k}={v:.3f}" for k, v in row.items()
                                   if k.startswith(("gather_", "tile_", "tma_", "grouped_", "dense_weight_"))
                                   and k.endswith("_ms")),
                        flush=True,
                    )
            path, result = save(rows, args)  # after every shape and M: a cut-off run keeps what it measured

    path, result = save(rows, args)
    try:
        from make_table import render  # benchmarks/make_table.py
    except ImportError:
        sys.path.insert(0, os.path.dirname(__file__))
        from make_table import render
    print(render(result, fmt="github"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
