"""CUDA correctness check of the Triton kernels against a float64 reference (run on the GPU machine).

    python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --final [--tiny]   # the tiles the autotuner picked in the benchmark run
    python benchmarks/gpu_check.py --routes           # eager route == registered op, column view == sort

Every block size, bf16 / fp16 / fp32 (tf32 off and on), autotuned and fixed tiles, decode and
prefill token counts not multiple of the tile, K from 1 to C; outputs are NaN-poisoned before the
kernel writes them; each gradient is computed twice and must be bitwise identical. Prints one line
per case and a summary; exits 1 on a failure.
"""

from __future__ import annotations

import os
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from sparsify.kernels import backward, forward, reference  # noqa: E402
from sparsify.kernels.column_view import column_view  # noqa: E402

TOL = {torch.float32: 1e-5, "tf32": 5e-3, torch.bfloat16: 1.5e-2, torch.float16: 3e-3}


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out.double() - ref).norm() / ref.norm()).item()


def topology(rows: int, cols: int, k: int) -> torch.Tensor:
    return torch.rand(rows, cols, device="cuda").argsort(dim=1)[:, :k].to(torch.int32)


def poisoned(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device="cuda")


def check(m, in_f, out_f, block, k, dtype, tf32, config=None):
    torch.backends.cuda.matmul.allow_tf32 = tf32
    rows, cols = out_f // block, in_f // block
    x = torch.randn(m, in_f, device="cuda", dtype=dtype)
    g = torch.randn(m, out_f, device="cuda", dtype=dtype)
    v = (torch.randn(rows, k, block, block, device="cuda") / (k * block) ** 0.5).to(dtype)
    b = torch.randn(out_f, device="cuda", dtype=dtype)
    col = topology(rows, cols, k)
    fc, ic, vc = (config or {}).get("fwd"), (config or {}).get("gi"), (config or {}).get("gv")
    y = forward.forward(x, v, col, b, config=fc, out=poisoned(m, out_f, dtype=dtype))
    gi = backward.grad_input(g, v, col, in_f, config=ic, out=poisoned(m, in_f, dtype=dtype))
    gi2 = backward.grad_input(g, v, col, in_f, config=ic, out=poisoned(m, in_f, dtype=dtype))
    gv = backward.grad_values(g, x, col, block, config=vc, out=poisoned(rows, k, block, block, dtype=dtype))
    gv2 = backward.grad_values(g, x, col, block, config=vc, out=poisoned(rows, k, block, block, dtype=dtype))
    xd, vd, gd, bd = x.double(), v.double(), g.double(), b.double()
    errs = (
        rel(y, reference.forward(xd, vd, col, bd)),
        rel(gi, reference.grad_input(gd, vd, col, in_f)),
        rel(gv, reference.grad_values(gd, xd, col, block)),
    )
    same = torch.equal(gi, gi2) and torch.equal(gv, gv2)
    tol = TOL["tf32"] if (dtype == torch.float32 and tf32) else TOL[dtype]
    ok = all(e < tol for e in errs) and same
    name = {torch.float32: "fp32" + ("/tf32" if tf32 else ""), torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    print(
        f"{'ok  ' if ok else 'FAIL'} M={m} {in_f}->{out_f} B={block} K={k}/{cols} {name} cfg={config is not None}: "
        f"fwd {errs[0]:.2e} grad_input {errs[1]:.2e} grad_values {errs[2]:.2e} bitwise-repeat {same}",
        flush=True,
    )
    return ok, errs


def main() -> None:
    torch.manual_seed(0)
    failures = 0
    worst = {}
    for block in (16, 32, 64, 128):
        for dtype, tf32 in ((torch.bfloat16, False), (torch.float16, False), (torch.float32, False), (torch.float32, True)):
            cases = [
                (77, 6 * block, 5 * block, 1),
                (77, 6 * block, 5 * block, 6),
                (13, 8 * block, 4 * block, 3),
                (1000, 8 * block, 16 * block, 4),
                (3000, 1024, 512, max(1, 1024 // block // 2)),
            ]
            if dtype != torch.bfloat16:
                cases = cases[1:2] + cases[3:4]
            for n, (m, in_f, out_f, k) in enumerate(cases):
                # autotuned for the first case of a kind, fixed tiles after (compiles cost device time)
                cfg = None if n == 0 else {
                    "fwd": {"BM": 64 if m > 32 else 16, "KSB": max(block, 128), "num_stages": 2},
                    "gi": {"BM": 64 if m > 32 else 16, "TSB": max(block, 128), "num_stages": 2},
                    "gv": {"BM": 64 if m > 32 else 16, "GSB": max(block, 128), "num_stages": 2},
                }
                ok, errs = check(m, in_f, out_f, block, k, dtype, tf32, cfg)
                failures += not ok
                key = (block, str(dtype), tf32)
                worst[key] = max(worst.get(key, (0, 0, 0)), errs)
    # fixed tiles the autotuner may not pick: split slots, split tokens, narrow gathers, parts of
    # blocks, masked-dense tiles; and the TMA forward
    for block in (16, 32, 64, 128):
        for dtype in (torch.bfloat16, torch.float32):
            cfgs = [{
                "fwd": {"BM": 16, "KSB": max(block, 128), "SPLIT": 3},
                "gi": {"BM": 32, "TSB": max(block, 64)},
                "gv": {"BM": 32, "GSB": max(block, 64), "SPLIT": 3},
            }]
            if block >= 128:
                cfgs.append({
                    "fwd": {"BM": 64, "KSB": 64, "num_stages": 4},
                    "gi": {"BM": 64, "TSB": 64, "num_stages": 4},
                    "gv": {"BM": 64, "GSB": 64, "num_stages": 4},
                })
            if block <= 64:
                tile = {"BM": 64, "BN": 128, "BK": 64, "num_stages": 3}
                cfgs.append({"fwd": {"tile": tile}, "gi": {"tile": tile},
                             "gv": {"tile": {"BO": 128, "BI": 64, "BT": 64, "num_stages": 3}, "SPLIT": 2}})
            for cfg in cfgs:
                ok, _ = check(200, 7 * block, 3 * block, block, 5, dtype, False, cfg)
                failures += not ok
    os.environ["SPARSIFY_TMA"] = "1"
    for block in (64, 128):
        for dtype in (torch.bfloat16, torch.float32):
            print("TMA forward:", end=" ")
            ok, _ = check(3000, 1024, 512, block, 1024 // block // 2, dtype, False)
            failures += not ok
    del os.environ["SPARSIFY_TMA"]
    print("worst relative errors (fwd, grad_input, grad_values) per (B, dtype, tf32):")
    for key, errs in worst.items():
        print(f"  {key}: " + " ".join(f"{e:.2e}" for e in errs))
    print(f"{failures} failures; device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}")
    sys.exit(1 if failures else 0)


def final() -> None:
    """The exact tiles the autotuner picked in the H100 benchmark run (benchmarks/results), for
    B = 64/128 (gather kernels, parts of blocks), B = 16/32 (masked-dense tiles), and the TMA
    forward; a short run that fits the last device call."""
    torch.manual_seed(1)
    failures = 0
    big = {
        "fwd": {"BM": 256, "KSB": 64, "num_warps": 8, "num_stages": 5},
        "gi": {"BM": 256, "TSB": 64, "num_warps": 8, "num_stages": 5},
        "gv": {"BM": 64, "GSB": 256, "num_warps": 8, "num_stages": 3},
    }
    mid = {
        "fwd": {"BM": 128, "KSB": 64, "num_warps": 4, "num_stages": 5},
        "gi": {"BM": 128, "TSB": 64, "num_warps": 4, "num_stages": 5},
        "gv": {"BM": 128, "GSB": 128, "num_warps": 8, "num_stages": 3},
    }
    small_fp32 = {
        "fwd": {"BM": 64, "KSB": 64, "num_warps": 4, "num_stages": 3},
        "gi": {"BM": 64, "TSB": 64, "num_warps": 4, "num_stages": 3},
        "gv": {"BM": 64, "GSB": 64, "num_warps": 4, "num_stages": 3},
    }
    tile = {"BM": 128, "BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3}
    tiles = {"fwd": {"tile": tile}, "gi": {"tile": tile},
             "gv": {"tile": {"BO": 128, "BI": 256, "BT": 64, "num_warps": 8, "num_stages": 3}}}
    runs = [
        (128, torch.bfloat16, big), (128, torch.bfloat16, mid), (64, torch.bfloat16, big), (64, torch.bfloat16, mid),
        (128, torch.float32, small_fp32), (64, torch.float32, small_fp32),
        (16, torch.bfloat16, tiles), (32, torch.bfloat16, tiles),
    ]
    tiny = "--tiny" in sys.argv  # the defaults at B = 128 and 16 only (a last, short device call)
    if tiny:
        runs = [runs[0], runs[6]]
    for block, dtype, cfg in runs:
        ok, _ = check(1000, 8 * block if block >= 64 else 1024, 4 * block if block >= 64 else 640, block,
                      4 if block >= 64 else 1024 // block // 2, dtype, False, cfg)
        failures += not ok
    os.environ["SPARSIFY_TMA"] = "1"
    for dtype in (torch.bfloat16,) if tiny else (torch.bfloat16, torch.float32):
        print("TMA forward (autotuned):", end=" ")
        ok, _ = check(3000, 1024, 512, 128, 4, dtype, False, None if not tiny else {"gi": big["gi"], "gv": big["gv"]})
        failures += not ok
    del os.environ["SPARSIFY_TMA"]
    print(f"{failures} failures; device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}")
    sys.exit(1 if failures else 0)


def routes() -> None:
    """sparsify.functional's eager route against the registered op on CUDA (bitwise, output and every
    gradient, bf16 autocast over float32 weights, bias and stats probe), the one-launch column view
    against a stable sort on benchmark-sized topologies, and small float32 problems (untimed configs)."""
    from sparsify import BlockSparseLinear
    from sparsify.functional import block_ell_linear

    torch.manual_seed(2)
    failures = 0
    for in_f, out_f, block, m in ((4096, 14336, 64, 2048), (14336, 4096, 16, 512), (1024, 512, 128, 16), (512, 2048, 32, 300)):
        layer = BlockSparseLinear(in_f, out_f, block_size=block, density=0.5, device="cuda")
        x = torch.randn(m, in_f, device="cuda")
        g = torch.randn(m, out_f, device="cuda", dtype=torch.bfloat16)
        results = []
        for fn in (block_ell_linear, torch.ops.sparsify.block_ell_linear):
            leaves = [t.detach().clone().requires_grad_(True) for t in (x, layer.values, layer.bias, layer.stats_probe)]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = fn(leaves[0], leaves[1], layer.col_indices, leaves[2], leaves[3])
            y.backward(g)
            results.append([y] + [t.grad for t in leaves])
        same = all(torch.equal(a, b) for a, b in zip(*results))
        err = rel(results[0][0], reference.forward(x.bfloat16().double(), layer.values.bfloat16().double(),
                                                    layer.col_indices, layer.bias.bfloat16().double()))
        ok = same and err < TOL[torch.bfloat16]
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} eager route vs op {in_f}->{out_f} B={block} M={m}: bitwise {same}, fwd {err:.2e}")
        slots, starts = column_view(layer.col_indices, in_f // block)
        flat = layer.col_indices.reshape(-1).long()
        ok = torch.equal(slots.long(), torch.sort(flat, stable=True).indices) and torch.equal(
            starts.long(), torch.searchsorted(flat.sort().values, torch.arange(in_f // block + 1, device="cuda")))
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} column view R*K={flat.numel()} C={in_f // block}")
    # small float32 problems launch one untimed config: it must fit in shared memory (a 64x64-block
    # grad_values config asked for 240 KB here once; common.tuning_candidates prevents it)
    for block in (16, 32, 64, 128):
        for in_f, out_f, m in ((256, 1024, 512), (1024, 256, 512), (512, 512, 16)):
            ok, _ = check(m, in_f, out_f, block, max(1, in_f // block // 2), torch.float32, True)
            failures += not ok
    print(f"{failures} failures; device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    routes() if "--routes" in sys.argv else final() if "--final" in sys.argv else main()
