"""Render a committed benchmark result (benchmarks/results/*.json) as a markdown table.

    python benchmarks/make_table.py                          # the newest date's result files, markdown to stdout
    python benchmarks/make_table.py results/X.json [Y.json]  # given files
    python benchmarks/make_table.py --write-readme           # the README gets the summary (speedups per block
                                                             # size x density) between <!-- bench-table:start -->
                                                             # and <!-- bench-table:end -->; the full table goes
                                                             # to benchmarks/results/<result name>.md
    python benchmarks/make_table.py --merge OUT.json A.json B.json ...
        # one table from several runs: per (shape, M, B, density) the row of the last file that has it
        # wins; each row keeps its run's file name under "run" (every ratio is still within one run)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from tabulate import tabulate

HERE = pathlib.Path(__file__).resolve().parent
START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"


def _x(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _variants(r: dict) -> str:
    """The kernels the launcher chooses between, each timed in the same run (large M, 50% only)."""
    parts = [
        f"{name} {r['dense_fwd_ms'] / r[f'{name}_fwd_ms']:.2f}x"
        for name in ("gather", "tile", "tma", "tma_persistent", "tma_ws", "grouped", "dense_weight")
        if r.get(f"{name}_fwd_ms")
    ]
    return " / ".join(parts) if parts else "-"


def render(result: dict, fmt: str = "github") -> str:
    """One row per (shape, M, B, density): speedups over dense and weight-state memory."""
    headers = [
        "in->out",
        "M",
        "B",
        "density",
        "dense fwd ms",
        "ours fwd ms",
        "fwd vs dense",
        "fwd+bwd vs dense",
        "fwd vs dense, CUDA graph",
        "fwd of each kernel (same run)",
        "PyTorch BSR fwd vs dense",
        "weight state MiB (dense)",
    ]
    merged = any("run" in r for r in result["rows"])
    if merged:
        headers.append("run")
    body = []
    for r in sorted(result["rows"], key=lambda r: (r["in"] * r["out"], r["in"], r["M"], r["B"], r["density"])):
        body.append(
            [
                f"{r['in']}->{r['out']}",
                r["M"],
                r["B"],
                f"{r['density']:.2f}",
                f"{r['dense_fwd_ms']:.4f}",
                f"{r['ours_fwd_ms']:.4f}",
                _x(r["speedup_fwd"]),
                _x(r["speedup_fwdbwd"]),
                _x(r.get("graph_speedup_fwd")),
                _variants(r),
                _x(r.get("bsr_speedup_fwd")),
                f"{r['weight_state_mib']:.1f} ({r['dense_weight_state_mib']:.1f})",
            ]
            + ([r.get("run", "")] if merged else [])
        )
    caption = (
        f"{result['device']}, torch {result['torch']}, triton {result['triton']}, {result['dtype']}, "
        f"{result['date']}; triton.testing.do_bench medians; speedup = dense F.linear time / sparse time "
        "(same run); CUDA graph = 20 calls captured in one graph, per-call time (decode rows only); "
        "weight state = values + grad + 2 Adam moments."
    )
    if result.get("note"):
        caption += " " + result["note"]
    return caption + "\n\n" + tabulate(body, headers=headers, tablefmt=fmt)


def summary(result: dict) -> str:
    """Speedups over dense per (shape, M, B) x density: forward / forward+backward, and for decode rows the
    forward inside a CUDA graph (the kernel without host overhead)."""
    nominal = (0.25, 0.5, 0.75)  # the benchmark's densities; K = round(density * C) may land beside them
    densities = sorted({min(nominal, key=lambda d: abs(d - r["density"])) for r in result["rows"]})
    cells: dict = {}
    for r in result["rows"]:
        column = min(nominal, key=lambda d: abs(d - r["density"]))
        text = f"{_x(r['speedup_fwd'])} / {_x(r['speedup_fwdbwd'])}"
        if r.get("graph_speedup_fwd"):
            text += f" (graph {_x(r['graph_speedup_fwd'])})"
        if abs(r["density"] - column) > 0.01:
            text += f" at {r['density']:.2f}"
        cells.setdefault((r["in"], r["out"], r["M"], r["B"]), {})[column] = text
    body = [
        [f"{i}->{o}", m, b] + [row.get(d, "-") for d in densities]
        for (i, o, m, b), row in sorted(cells.items(), key=lambda kv: (kv[0][0] * kv[0][1], kv[0][0], kv[0][2], kv[0][3]))
    ]
    caption = (
        f"{result['device']}, torch {result['torch']}, triton {result['triton']}, {result['dtype']}, {result['date']}. "
        "Speedup over dense `F.linear` (cuBLAS) measured in the same run, `triton.testing.do_bench` medians: "
        "forward / forward+backward; decode rows (M = 16) also the forward inside a CUDA graph (graph), since plain "
        "eager calls at that size measure host overhead. Density = kept fraction of blocks, K / C per row; "
        "where K / C cannot hit it (few block-columns) the cell names the density measured."
    )
    return caption + "\n\n" + tabulate(body, headers=["in->out", "M", "B"] + [f"density {d:g}" for d in densities],
                                         tablefmt="github")


def _is_layer_result(result: dict) -> bool:
    """bench_layer.py's rows (kernel_profile.py's and the design studies' files have rows too, of other kinds)."""
    rows = result.get("rows") or []
    return bool(rows) and {"speedup_fwd", "speedup_fwdbwd", "dense_fwd_ms"} <= rows[0].keys()


def newest_results() -> list[pathlib.Path]:
    """The layer-benchmark files of the newest date: the plain <device>-<date>.json ones where there
    are (the current table, possibly merged), else every file of that date."""
    files = [p for p in (HERE / "results").glob("*.json") if _is_layer_result(json.loads(p.read_text()))]
    if not files:
        sys.exit("no benchmarks/results/*.json yet; run benchmarks/bench_layer.py on a GPU first")
    dates = {p: json.loads(p.read_text()).get("date", "") for p in files}
    newest = [p for p in files if dates[p] == max(dates.values())]
    plain = [p for p in newest if p.stem.endswith(dates[p])]
    return sorted(plain or newest, key=lambda p: (len(p.stem), p.name))


MERGED_NOTE = "Merged runs (column 'run'). "


def merge(paths: list[pathlib.Path]) -> dict:
    """Rows of several runs of one device, the later file's row winning per (shape, M, B, density). A
    merged file given again keeps each row's run; runs left with no row are dropped, with their notes."""
    runs = [(p.stem, json.loads(p.read_text())) for p in paths]
    devices = {r["device"] for _, r in runs}
    if len(devices) != 1:
        sys.exit(f"--merge takes runs of one device, got {sorted(devices)}")
    rows, run_notes = {}, {}
    for name, result in runs:
        run_notes.update(result.get("run_notes") or ({name: result["note"]} if result.get("note") else {}))
        for row in result["rows"]:
            rows[(row["in"], row["out"], row["M"], row["B"], row["density"])] = {**row, "run": row.get("run", name)}
    kept = list(dict.fromkeys(row["run"] for row in rows.values()))
    notes = {run: run_notes[run] for run in kept if run in run_notes}
    last = runs[-1][1]
    return {**{k: last[k] for k in ("device", "date", "torch", "triton", "dtype") if k in last},
            "merged_from": kept, "run_notes": notes,
            "note": MERGED_NOTE + " ".join(f"[{run}] {note}" for run, note in notes.items()),
            "rows": list(rows.values())}


def write_readme(table: str, readme: pathlib.Path) -> None:
    text = readme.read_text()
    if START not in text or END not in text or text.index(START) > text.index(END):
        sys.exit(f"{readme}: add the markers {START} and {END} where the table belongs, then run again")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{table}\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="*", help="results JSON files (default: the newest date's under benchmarks/results)")
    parser.add_argument("--write-readme", action="store_true", help="replace the table block in README.md")
    parser.add_argument("--readme", default=str(HERE.parent / "README.md"))
    parser.add_argument("--merge", metavar="OUT", help="write the merged runs (the files given) to OUT")
    args = parser.parse_args()
    if args.merge:
        pathlib.Path(args.merge).write_text(json.dumps(merge([pathlib.Path(p) for p in args.results]), indent=1))
        args.results = [args.merge]
    paths = [pathlib.Path(p) for p in args.results] or newest_results()
    results = [json.loads(p.read_text()) for p in paths]
    layer_results = [(p, r) for p, r in zip(paths, results) if _is_layer_result(r)]
    table = "\n\n".join(render(r) for _, r in layer_results)
    print(table)
    if args.write_readme:
        for path, result in layer_results:
            path.with_suffix(".md").write_text(render(result) + "\n")
        links = " ".join(f"Every row: [{p.with_suffix('.md').name}](benchmarks/results/{p.with_suffix('.md').name})."
                         for p, _ in layer_results)
        write_readme("\n\n".join(summary(r) for _, r in layer_results) + "\n\n" + links, pathlib.Path(args.readme))


if __name__ == "__main__":
    main()
