"""Decode (few tokens): how many programs should share a block-row's slots? A sweep of the gather
forward's slot split on one GPU, each candidate replayed in a CUDA graph (as a decode loop under
``mode="reduce-overhead"`` sees it), weights rotating through copies so they are read from DRAM.

    python benchmarks/decode_split.py [--shapes 4096x14336,14336x4096] [--tokens 16] [--configs] [--out DIR]

Why: at M = 16 the forward is a stream of the weights (half of dense's bytes at density 0.5), and how many
loads a program keeps in flight sets its rate. ``dispatch.split_slots`` splits a block-row's slots so that a
program reads ~56 KB of weights (x B/32 above B = 32), a rule fitted to this sweep's first run (2026-12-02);
``--configs`` adds the forward's decode tiles and SWEEP_TILES, each forced at that split, to see which the
autotuner should find. Each split is timed with the autotuner's tile for it (SPLIT is in the forward's autotune key; the tile
it chose is in the row), every candidate and dense in alternating rounds (``timing.rounds_ms``), each
output checked against float64.
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

from timing import cuda_graph_of, rounds_ms  # benchmarks/timing.py (this script's folder is on sys.path)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from sparsify.block_ell import to_dense  # noqa: E402
from sparsify import kernel_options  # noqa: E402
from sparsify.kernels import dispatch  # noqa: E402
from sparsify.kernels.forward import FORWARD_CONFIGS, _forward_kernel  # noqa: E402

try:  # the Gluon decode kernel (a design under test): Hopper and a Triton with Gluon
    from sparsify.kernels import decode_gluon  # noqa: E402
except ImportError:
    decode_gluon = None
GLUON = "gluon"  # the candidate's config: the Gluon kernel, not triton_forward

SPLITS = (1, 2, 4, 8, 16)
# Decode tiles beside the forward's table, timed with --configs before any joins it (benchmarks/NOTES.md, sixth
# session): fewer warps a program, so more programs share an SM; and unpipelined ones (num_stages 1), whose plain
# activation loads are cached in L1, where the SM's other programs re-read them (the pipelined copies bypass L1,
# and at B = 16 those re-reads are as many bytes through L2 as the weights).
SWEEP_TILES = [(16, 128, 2, 4), (16, 128, 1, 4), (16, 64, 2, 6), (16, 64, 1, 6), (16, 128, 2, 6),
               (16, 128, 4, 1), (16, 128, 2, 1), (16, 64, 4, 1)]
COPIES, CALLS = 4, 20  # weight copies the graph rotates through; calls captured in one graph


def with_split(split: int | None, fn):
    """Run ``fn`` with dispatch.split_slots answering ``split`` (None: its own rule)."""
    original = dispatch.split_slots
    if split is not None:
        dispatch.split_slots = lambda num_tokens, block_rows, k, *rest: min(split, k)
    try:
        return fn()
    finally:
        dispatch.split_slots = original


def forward_with(opts: dict, x, values, col, out, config):
    with kernel_options(**opts):
        return dispatch.triton_forward(x, values, col, None, out=out, config=config)


def candidates(configs: bool, block, m, block_rows, k, elem, device):
    """(name, split for with_split, config for triton_forward, kernel options): the default route, it with
    the partials summed inside the kernel and with x in boxes, each split of SPLITS (autotuned), and with
    ``configs`` each decode tile of the forward's table and SWEEP_TILES at the default split."""
    yield "default", None, None, {}
    yield "default, summed in the kernel", None, None, {"split_reduce": "fused"}
    # x first copied into [C, M, B] boxes (a slot's activations as whole lines; the copy is in the timing)
    yield "default, x in boxes", None, {"X_BOXES": True}, {}
    yield "x in shared memory (Gluon, decode_gluon.py)", None, GLUON, {}
    for split in SPLITS:
        yield f"split {split}", split, None, {}
    if not configs:
        return
    split = dispatch.split_slots(m, block_rows, k, block, elem, device)
    for bm, ksb, warps, stages in [c for c in FORWARD_CONFIGS if c[0] <= 32] + SWEEP_TILES:
        if ksb <= 8 * block and (ksb >= block or (ksb >= 64 and block % ksb == 0)):
            tile = {"BM": bm, "KSB": ksb, "num_warps": warps, "num_stages": stages, "SPLIT": split}
            yield f"tile {bm}x{ksb} w{warps} s{stages} split {split}", None, tile, {}
            if stages == 1:  # unpipelined: x from L1 where its boxes are re-read
                yield f"tile {bm}x{ksb} w{warps} s1 split {split}, x in boxes", None, {**tile, "X_BOXES": True}, {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="4096x14336,14336x4096")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--blocks", default="16,32,64,128")
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--configs", action="store_true",
                        help="also every decode tile of the forward's table, each at the default split, untuned")
    args = parser.parse_args()
    dtype, m = torch.bfloat16, args.tokens
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for shape in args.shapes.split(","):
        in_f, out_f = (int(v) for v in shape.split("x"))
        x = torch.randn(m, in_f, device="cuda", dtype=dtype, generator=gen)
        dense_w = [torch.randn(out_f, in_f, device="cuda", dtype=dtype, generator=gen) / in_f**0.5 for _ in range(COPIES)]
        for block in (int(b) for b in args.blocks.split(",")):
            num_cols, block_rows = in_f // block, out_f // block
            k = max(1, round(args.density * num_cols))
            col = torch.stack([torch.randperm(num_cols, device="cuda", generator=gen)[:k] for _ in range(block_rows)])
            col = col.to(torch.int32)
            values = [(torch.randn(block_rows, k, block, block, device="cuda", generator=gen) / (k * block) ** 0.5).to(dtype)
                      for _ in range(COPIES)]
            ref = F.linear(x.double(), to_dense(values[0].double(), col, in_f))
            outs = [torch.full((m, out_f), float("nan"), device="cuda", dtype=dtype) for _ in range(COPIES)]
            graphs, checks = {"dense": cuda_graph_of([lambda w=w: F.linear(x, w) for w in dense_w], CALLS)}, {}
            picks = {}
            for name, split, config, opts in candidates(args.configs, block, m, block_rows, k, x.element_size(), x.device):
                if config == GLUON:
                    if decode_gluon is None or decode_gluon.decode_config(x, values[0]) is None:
                        continue  # no Gluon here, or x does not fit on chip at this shape
                    sms = dispatch.num_sms(x.device)
                    calls = [lambda v=v, y=y: decode_gluon.forward_decode(x, v, col, y, sms) for v, y in zip(values, outs)]
                else:
                    calls = [lambda v=v, y=y, config=config, opts=opts: forward_with(opts, x, v, col, y, config)
                             for v, y in zip(values, outs)]
                outs[0].fill_(float("nan"))
                try:
                    graphs[name] = with_split(split, lambda: cuda_graph_of(calls, CALLS))
                except Exception as error:  # noqa: BLE001 - a swept tile that does not fit this GPU
                    print(f"{name}: {type(error).__name__}: {str(error)[:120]}", flush=True)
                    continue
                picks[name] = str(getattr(_forward_kernel, "best_config", None)) if config is None else str(config)
                graphs[name].replay()
                torch.cuda.synchronize()
                checks[name] = ((outs[0].double() - ref).norm() / ref.norm()).item()
            times = rounds_ms({name: g.replay for name, g in graphs.items()}, rounds=5)
            dense_ms = times["dense"]["ms"] / CALLS
            chosen = dispatch.split_slots(m, block_rows, k, block, x.element_size(), x.device)
            for name, t in times.items():
                if name == "dense":
                    continue
                ms = t["ms"] / CALLS
                rows.append({"in": in_f, "out": out_f, "M": m, "B": block, "K": k, "candidate": name,
                             "default_split": chosen, "ms": ms, "dense_ms": dense_ms, "speedup": dense_ms / ms,
                             "spread": t["spread"], "dense_spread": times["dense"]["spread"],
                             "rel_error": checks[name], "config": picks[name]})
                print(f"{in_f}->{out_f} M={m} B={block} {name} (default {chosen}): {1000 * ms:.1f} us, "
                      f"{dense_ms / ms:.2f}x dense, spread {t['spread']:.0%}, err {checks[name]:.1e}", flush=True)
            del graphs
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name()
    result = {"device": device, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "triton": triton.__version__, "dtype": str(dtype), "copies": COPIES, "calls_a_graph": CALLS, "rows": rows}
    path = out / f"decode-split-{device.replace(' ', '_')}-{result['date']}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
