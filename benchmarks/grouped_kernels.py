"""The grouped Gluon kernel (sparsify/kernels/grouped_gluon.py: the forward over groups of block-rows,
grad_input over groups of block-columns) beside the kernels the dispatcher runs today, on one GPU at
large token counts: first checked against float64 on small awkward cases (token tail, bias, a last
group with fewer blocks, a repeated column, columns outside [0, C); outputs poisoned), then timed
against dense F.linear (forward) and the dense grad_input GEMM in the same run, each timed output checked
against float64 too. Per block size the candidates and both dense GEMMs are timed in turn, ROUNDS rounds
(``timing.rounds_ms``: do_bench medians, the median of the rounds; the rounds' spread is kept per row).

    python benchmarks/grouped_kernels.py [--shapes 4096x14336,14336x4096] [--tokens 8192] [--out DIR]
    python benchmarks/grouped_kernels.py --designs 64:4:STAGES=4:num_warps=8,128:1   # B:G[:config]
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys

import torch
import torch.nn.functional as F
import triton

from timing import rounds_ms  # benchmarks/timing.py (this script's folder is on sys.path)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from sparsify.block_ell import to_dense  # noqa: E402
from sparsify.kernels import dispatch  # noqa: E402
from sparsify.kernels.row_groups import forward_entries, grad_input_entries  # noqa: E402

# (block size, group size, config) of the Gluon kernel to time; today's kernels are timed at each block size
GLUON = [  # what a design leaves out, grouped_gluon.launch_config fills in
    # the default designs (dispatch.GROUPED_DESIGNS) and their warp-specialized variants
    (64, 2, {"BM": 256}), (64, 2, {"BM": 256, "WS": True}), (32, 2, {"BM": 256}),
    # the box on a barrier ring of its own: 3 CTA-wide bar.syncs an entry instead of 5 (the top stall at B = 64)
    (64, 2, {"BM": 256, "BOX_BARRIERS": True}), (32, 2, {"BM": 256, "BOX_BARRIERS": True}),
    (64, 2, {"BM": 256, "BOX_BARRIERS": True, "WS": True}), (64, 4, {"BM": 256, "BOX_BARRIERS": True}),
    (128, 2, {"BOX_BARRIERS": True}), (16, 2, {"BM": 256, "STAGES": 8, "BOX_BARRIERS": True}),
    (64, 1, {"BM": 256}), (128, 2, {}),
]
CHECKS = [  # (B, G, M, R, C, K, config)
    (64, 2, 77, 7, 6, 3, {}), (64, 4, 300, 9, 8, 4, {}), (32, 4, 129, 5, 12, 6, {}), (64, 1, 1000, 4, 16, 8, {"num_warps": 4}),
    (128, 2, 200, 3, 4, 2, {"STAGES": 3}), (16, 4, 64, 6, 10, 5, {}), (64, 2, 130, 4, 8, 8, {"STAGES": 2}),
    (32, 4, 129, 5, 12, 6, {"STAGES": 8, "IN_FLIGHT": 5}), (64, 4, 300, 9, 8, 4, {"WS": True, "IN_FLIGHT": 3}),
    (64, 2, 300, 7, 6, 3, {"BM": 256}), (64, 2, 513, 5, 8, 4, {"BM": 256, "WS": True}), (32, 4, 77, 9, 12, 6, {"BM": 256}),
    (64, 2, 300, 7, 6, 3, {"BM": 256, "BOX_BARRIERS": True}), (32, 4, 129, 5, 12, 6, {"STAGES": 8, "BOX_BARRIERS": True}),
    (64, 4, 300, 9, 8, 4, {"WS": True, "BOX_BARRIERS": True}),
]


ROUNDS = 5  # each block size's candidates (dense included) timed in turn this many times


def relative_error(y: torch.Tensor, x, values, col, in_f, bias=None) -> float:
    bad = (col < 0) | (col >= in_f // values.shape[2])
    kept = values.double().masked_fill(bad[:, :, None, None], 0)
    ref = F.linear(x.double(), to_dense(kept, torch.where(bad, 0, col), in_f), None if bias is None else bias.double())
    return ((y.double() - ref).norm() / ref.norm()).item()


def grad_input_error(gx: torch.Tensor, g, values, col, in_f) -> float:
    bad = (col < 0) | (col >= in_f // values.shape[2])
    kept = values.double().masked_fill(bad[:, :, None, None], 0)
    ref = g.double() @ to_dense(kept, torch.where(bad, 0, col), in_f)
    return ((gx.double() - ref).norm() / ref.norm()).item()


def gluon_checks(forward_grouped, grad_input_grouped) -> list[dict]:
    results = []
    gen = torch.Generator(device="cuda").manual_seed(1)
    for block, group, m, rows, cols, k, config in CHECKS:
        x = torch.randn(m, cols * block, device="cuda", generator=gen).to(torch.bfloat16)
        values = (torch.randn(rows, k, block, block, device="cuda", generator=gen) / (k * block) ** 0.5).to(torch.bfloat16)
        col = torch.stack([torch.randperm(cols, device="cuda", generator=gen)[:k] for _ in range(rows)]).to(torch.int32)
        col[0, -1] = col[0, 0]  # a repeated column
        col[-1, 0] = cols  # columns outside [0, C)
        col[1 % rows, -1] = -1
        bias = torch.randn(rows * block, device="cuda", generator=gen).to(torch.bfloat16)
        y = torch.full((m, rows * block), float("nan"), device="cuda", dtype=torch.bfloat16)
        forward_grouped(x, values, forward_entries(col, cols, group), bias, y, config)
        g = torch.randn(m, rows * block, device="cuda", generator=gen).to(torch.bfloat16)
        gx = torch.full((m, cols * block), float("nan"), device="cuda", dtype=torch.bfloat16)
        grad_input_grouped(g, values, grad_input_entries(col, cols, group), gx, config)
        results.append({"B": block, "G": group, "M": m, "R": rows, "C": cols, "K": k, "config": config,
                        "rel_error": relative_error(y, x, values, col, cols * block, bias),
                        "grad_input_rel_error": grad_input_error(gx, g, values, col, cols * block),
                        "finite": bool(torch.isfinite(y).all() and torch.isfinite(gx).all())})
        print("check", results[-1], flush=True)
    return results


def parse_designs(text: str) -> list:
    designs = []
    for item in text.split(","):
        block, group, *pairs = item.split(":")
        designs.append((int(block), int(group), {key: int(v) for key, v in (p.split("=") for p in pairs)}))
    return designs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="4096x14336,14336x4096")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--designs", default=None, help="B:G[:key=value...],... (default: the GLUON table)")
    parser.add_argument("--profile", action="store_true",
                        help="for Nsight Compute: no checks, no timing, each design launched twice")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    from sparsify.kernels.grouped_gluon import forward_grouped, grad_input_grouped

    designs = parse_designs(args.designs) if args.designs else GLUON
    checks = [] if args.profile else gluon_checks(forward_grouped, grad_input_grouped)
    dtype, m = torch.bfloat16, args.tokens
    rows_out = []
    for shape in args.shapes.split(","):
        in_f, out_f = (int(v) for v in shape.split("x"))
        gen = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(m, in_f, device="cuda", dtype=dtype, generator=gen)
        w = torch.randn(out_f, in_f, device="cuda", dtype=dtype, generator=gen) / in_f**0.5
        g = torch.randn(m, out_f, device="cuda", dtype=dtype, generator=gen)
        dense = {"forward": lambda: F.linear(x, w), "grad_input": lambda: g @ w}
        for block in sorted({d[0] for d in designs}):
            num_cols, block_rows = in_f // block, out_f // block
            k = max(1, round(args.density * num_cols))
            col = torch.stack([torch.randperm(num_cols, device="cuda", generator=gen)[:k] for _ in range(block_rows)])
            col = col.to(torch.int32)
            values = (torch.randn(block_rows, k, block, block, device="cuda", generator=gen) / (k * block) ** 0.5).to(dtype)
            y = torch.full((m, out_f), float("nan"), device="cuda", dtype=dtype)
            gx = torch.full((m, in_f), float("nan"), device="cuda", dtype=dtype)
            runs = [("today", "forward", 1, {}, y, lambda: dispatch.triton_forward(x, values, col, None, out=y)),
                    ("today", "grad_input", 1, {}, gx,
                     lambda: dispatch.triton_grad_input(g, values, col, in_f, out=gx))]
            for b, group, config in designs:
                if b == block:
                    fe, ge = forward_entries(col, num_cols, group), grad_input_entries(col, num_cols, group)
                    runs.append(("gluon", "forward", group, config, y,
                                 lambda e=fe, c=config: forward_grouped(x, values, e, None, y, c)))
                    runs.append(("gluon", "grad_input", group, config, gx,
                                 lambda e=ge, c=config: grad_input_grouped(g, values, e, gx, c)))
            if args.profile:
                for *_, run in runs:
                    run()
                    run()
                torch.cuda.synchronize()
                continue
            checked = []  # (row so far, run): what built, launched and was checked against float64
            for design, product, group, config, target, run in runs:
                target.fill_(float("nan"))
                try:
                    run()
                    torch.cuda.synchronize()
                except Exception as error:  # a config that does not build or launch here is a result too
                    rows_out.append({"in": in_f, "out": out_f, "B": block, "design": design, "product": product,
                                     "G": group, "config": config, "error": f"{type(error).__name__}: {str(error)[:300]}"})
                    print(rows_out[-1], flush=True)
                    continue
                finite = bool(torch.isfinite(target).all())
                if product == "forward":
                    error = relative_error(target, x, values, col, in_f)
                else:
                    error = grad_input_error(target, g, values, col, in_f)
                checked.append(({"in": in_f, "out": out_f, "M": m, "B": block, "density": k / num_cols,
                                 "design": design, "product": product, "G": group, "config": config,
                                 "rel_error": error, "finite": finite}, run))
            times = rounds_ms({**{f"dense {p}": fn for p, fn in dense.items()},
                               **{str(i): run for i, (_, run) in enumerate(checked)}}, rounds=ROUNDS)
            for i, (row, _) in enumerate(checked):
                ms, reference_ms = times[str(i)]["ms"], times[f"dense {row['product']}"]["ms"]
                rows_out.append({**row, "ms": ms, "dense_ms": reference_ms, "speedup": reference_ms / ms,
                                 "spread": times[str(i)]["spread"],
                                 "dense_spread": times[f"dense {row['product']}"]["spread"]})
                print(f"{in_f}->{out_f} B={block} {row['product']} {row['design']} G={row['G']} {row['config']}: "
                      f"{ms:.3f} ms (rounds spread {times[str(i)]['spread']:.0%}), {reference_ms / ms:.2f}x dense, "
                      f"err {row['rel_error']:.1e}{'' if row['finite'] else ' NOT FINITE'}", flush=True)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name()
    result = {"device": device, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "triton": triton.__version__, "dtype": str(dtype), "checks": checks, "rows": rows_out}
    path = out / f"grouped-kernels-{device.replace(' ', '_')}-{result['date']}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
