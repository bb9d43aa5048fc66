"""Two bench_layer.py result files of one call, row by row: is any kernel slower in the second?

    python benchmarks/compare_runs.py BEFORE.json AFTER.json [--tolerance 0.06]

For every (shape, M, B, density) row both files have, the ratio after / before of each time the layer
benchmark records (forward, forward+backward, grad_input, grad_values, the CUDA-graph forward) and of
dense's own times (the run-to-run spread: dense code is the same in both trees). A time is "slower"
when its ratio exceeds 1 + tolerance (default 6%: the spread measured between two timings of one kernel
in one run, benchmarks/NOTES.md). Exit status 1 when any is. Plain calls at M <= 64 measure the host's pace,
not the kernels (dense's own fwd+bwd moved by 1.7x between two such runs): judge decode by the graph column. How both trees are timed in one device call:
benchmarks/before_after_call.sh.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from tabulate import tabulate

TIMES = ("ours_fwd_ms", "ours_fwdbwd_ms", "ours_grad_input_ms", "ours_grad_values_ms", "graph_ours_fwd_ms")
DENSE = ("dense_fwd_ms", "dense_fwdbwd_ms")


def _rows(path: pathlib.Path) -> dict:
    return {(r["in"], r["out"], r["M"], r["B"], r["density"]): r for r in json.loads(path.read_text())["rows"]}


def compare(before: dict, after: dict, tolerance: float) -> tuple[list[list], int]:
    """One table row per shared benchmark row, and how many times are slower than the tolerance allows."""
    table, slower = [], 0
    for key in sorted(set(before) & set(after)):
        cells = []
        for name in TIMES + DENSE:
            old, new = before[key].get(name), after[key].get(name)
            if not old or not new:
                cells.append("-")
                continue
            ratio = new / old
            flag = name in TIMES and ratio > 1 + tolerance
            slower += flag
            cells.append(f"{ratio:.2f}{' SLOWER' if flag else ''}")
        table.append([f"{key[0]}->{key[1]}", key[2], key[3], key[4], *cells])
    return table, slower


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=pathlib.Path)
    parser.add_argument("after", type=pathlib.Path)
    parser.add_argument("--tolerance", type=float, default=0.06)
    args = parser.parse_args()
    table, slower = compare(_rows(args.before), _rows(args.after), args.tolerance)
    headers = ["in->out", "M", "B", "density", *(n.replace("_ms", "") for n in TIMES + DENSE)]
    print(f"after / before ({args.after.name} over {args.before.name}); > {1 + args.tolerance:.2f} is slower")
    print(tabulate(table, headers=headers, tablefmt="github", disable_numparse=True))
    print(f"{slower} times slower than the tolerance")
    sys.exit(1 if slower else 0)


if __name__ == "__main__":
    main()
