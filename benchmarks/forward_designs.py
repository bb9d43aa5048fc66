"""The forward designs side by side on one GPU (large token counts): the dispatcher's choice today, the
row-group "rows" kernel (G block-rows share each activation box) and the "union" kernel (one wide tile
over the group's listed columns), each checked against float64 on fresh random inputs (outputs poisoned
first) and timed against dense F.linear in the same run (do_bench medians).

    python benchmarks/forward_designs.py [--shapes 4096x14336,14336x4096] [--tokens 8192] [--out DIR]
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
from triton.testing import do_bench

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from sparsify.block_ell import to_dense  # noqa: E402
from sparsify.kernels import dispatch  # noqa: E402
from sparsify.kernels.forward_rows import forward_row_groups  # noqa: E402
from sparsify.kernels.row_groups import row_groups  # noqa: E402

# (design, block size, group size) to try; "today" = dispatch.triton_forward's own choice
DESIGNS = [("today", b, 1) for b in (16, 32, 64, 128)] + [
    ("rows", 16, 2), ("rows", 16, 4),
    ("rows", 32, 1), ("rows", 32, 2), ("rows", 32, 4),
    ("rows", 64, 1), ("rows", 64, 2), ("rows", 64, 4),
    ("rows", 128, 1), ("rows", 128, 2),
    ("union", 16, 4), ("union", 16, 8), ("union", 32, 2), ("union", 32, 4), ("union", 64, 2),
]
# the Gluon design with its configs: (block size, group size, {"BM", "STAGES", "num_warps"})
GLUON = [
    (64, 1, {"STAGES": 4}), (64, 2, {"STAGES": 3}), (64, 2, {"STAGES": 4}), (64, 4, {"STAGES": 3, "num_warps": 8}),
    (32, 2, {"STAGES": 4}), (32, 4, {"STAGES": 4}), (32, 4, {"STAGES": 6}),
    (128, 1, {"STAGES": 3}), (128, 2, {"STAGES": 2, "num_warps": 8}),
    (16, 4, {"STAGES": 6}),
]


def gluon_checks() -> list[dict]:
    """The Gluon forward against float64 on small awkward cases: a token tail, bias, a last group with
    fewer rows, a repeated column, columns outside [0, C); outputs poisoned first."""
    from sparsify.kernels.forward_gluon import forward_gluon

    results = []
    gen = torch.Generator(device="cuda").manual_seed(1)
    for block, group, m, rows, cols, k, config in [
        (64, 2, 77, 7, 6, 3, {}), (64, 4, 300, 9, 8, 4, {"num_warps": 8}), (32, 4, 129, 5, 12, 6, {}),
        (128, 2, 200, 3, 4, 2, {"STAGES": 2, "num_warps": 8}), (16, 4, 64, 6, 10, 5, {}), (64, 1, 1000, 4, 16, 8, {}),
    ]:
        x = torch.randn(m, cols * block, device="cuda", generator=gen).to(torch.bfloat16)
        values = (torch.randn(rows, k, block, block, device="cuda", generator=gen) / (k * block) ** 0.5).to(torch.bfloat16)
        col = torch.stack([torch.randperm(cols, device="cuda", generator=gen)[:k] for _ in range(rows)]).to(torch.int32)
        col[0, 1] = col[0, 0]
        col[-1, 0] = cols
        col[1, -1] = -1
        bias = torch.randn(rows * block, device="cuda", generator=gen).to(torch.bfloat16)
        y = torch.full((m, rows * block), float("nan"), device="cuda", dtype=torch.bfloat16)
        forward_gluon(x, values, row_groups(col, cols, group), bias, y, config)
        bad = (col < 0) | (col >= cols)
        kept = values.double().masked_fill(bad[:, :, None, None], 0)
        ref = F.linear(x.double(), to_dense(kept, torch.where(bad, 0, col), cols * block), bias.double())
        error = ((y.double() - ref).norm() / ref.norm()).item()
        results.append({"B": block, "G": group, "M": m, "R": rows, "C": cols, "K": k, "rel_error": error,
                        "finite": bool(torch.isfinite(y).all())})
        print("gluon check", results[-1], flush=True)
    return results


def bench(fn) -> float:
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="4096x14336,14336x4096")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--designs", default=None, help="e.g. rows:64:2,union:16:8 (default: all)")
    parser.add_argument("--gluon", action="store_true", help="today's forward and the Gluon design only")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    designs = [(d, b, g, None) for d, b, g in DESIGNS] if not args.designs else [
        (d, int(b), int(g), None) for d, b, g in (item.split(":") for item in args.designs.split(","))
    ]
    if args.gluon:
        designs = [("today", b, 1, None) for b in (16, 32, 64, 128)] + [("gluon", b, g, c) for b, g, c in GLUON]
    checks = gluon_checks() if args.gluon else []
    dtype, m = torch.bfloat16, args.tokens
    rows_out = []
    for shape in args.shapes.split(","):
        in_f, out_f = (int(v) for v in shape.split("x"))
        gen = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(m, in_f, device="cuda", dtype=dtype, generator=gen)
        w = torch.randn(out_f, in_f, device="cuda", dtype=dtype, generator=gen) / in_f**0.5
        dense_ms = bench(lambda: F.linear(x, w))
        for design, block, group, gluon_config in designs:
            num_cols, block_rows = in_f // block, out_f // block
            k = max(1, round(args.density * num_cols))
            col = torch.stack([torch.randperm(num_cols, device="cuda", generator=gen)[:k] for _ in range(block_rows)])
            col = col.to(torch.int32)
            values = (torch.randn(block_rows, k, block, block, device="cuda", generator=gen) / (k * block) ** 0.5).to(dtype)
            y = torch.full((m, out_f), float("nan"), device="cuda", dtype=dtype)
            if design == "today":
                run = lambda: dispatch.triton_forward(x, values, col, None, out=y)  # noqa: E731
            elif design == "gluon":
                from sparsify.kernels.forward_gluon import forward_gluon

                listing = row_groups(col, num_cols, group)
                run = lambda: forward_gluon(x, values, listing, None, y, gluon_config)  # noqa: E731
            else:
                listing = row_groups(col, num_cols, group)
                run = lambda: forward_row_groups(x, values, listing, None, y, design)  # noqa: E731
            try:
                run()
                torch.cuda.synchronize()
            except Exception as error:  # a design that does not build here is a result too
                rows_out.append({"in": in_f, "out": out_f, "B": block, "design": design, "G": group,
                                 "error": f"{type(error).__name__}: {str(error)[:300]}"})
                print(rows_out[-1], flush=True)
                continue
            ref = F.linear(x.double(), to_dense(values.double(), col, in_f))
            finite = bool(torch.isfinite(y).all())
            error = ((y.double() - ref).norm() / ref.norm()).item()
            del ref
            ms = bench(run)
            listing_ms = bench(lambda: row_groups(col, num_cols, group)) if design != "today" else None
            row = {"in": in_f, "out": out_f, "M": m, "B": block, "density": k / num_cols, "design": design,
                   "G": group, "ms": ms, "dense_ms": dense_ms, "speedup_fwd": dense_ms / ms,
                   "rel_error": error, "finite": finite, "listing_build_ms": listing_ms}
            best = getattr(forward_row_groups.__globals__["KERNELS"].get(design), "best_config", None)
            if best is not None:
                row["config"] = str(best)
            if gluon_config is not None:
                row["config"] = str(gluon_config)
            rows_out.append(row)
            print(f"{in_f}->{out_f} B={block} {design} G={group}: {ms:.3f} ms, {dense_ms / ms:.2f}x dense, "
                  f"err {error:.1e}{'' if finite else ' NOT FINITE'} {row.get('config', '')}", flush=True)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name()
    result = {"device": device, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "triton": triton.__version__, "dtype": str(dtype), "rows": rows_out, "gluon_checks": checks}
    path = out / f"forward-designs{'-gluon' if args.gluon else ''}-{device.replace(' ', '_')}-{result['date']}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
