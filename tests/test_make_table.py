"""benchmarks/make_table.py's merge: the later run's row wins per (shape, M, B, density), a merged file
merged again keeps each row's own run, and a run left with no row is dropped with its note."""

import importlib.util
import json
import pathlib

HERE = pathlib.Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("make_table", HERE.parent / "benchmarks" / "make_table.py")
make_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_table)


def row(m: int, block: int, speedup: float) -> dict:
    return {"in": 64, "out": 128, "M": m, "B": block, "density": 0.5, "speedup_fwd": speedup,
            "speedup_fwdbwd": speedup, "dense_fwd_ms": 1.0}


def write(path: pathlib.Path, rows: list, **fields) -> pathlib.Path:
    path.write_text(json.dumps({"device": "GPU", "date": "2026-12-02", "rows": rows, **fields}))
    return path


def test_merging_a_merged_file_keeps_each_rows_run_and_sources(tmp_path):
    a = write(tmp_path / "a.json", [row(16, 16, 1.0), row(16, 32, 1.1)], note="from a")
    b = write(tmp_path / "b.json", [row(16, 32, 2.0)])
    first = tmp_path / "first.json"
    first.write_text(json.dumps(make_table.merge([a, b])))
    c = write(tmp_path / "c.json", [row(16, 16, 3.0), row(8192, 64, 4.0)], note="from c")
    merged = make_table.merge([first, c])
    by_key = {(r["M"], r["B"]): (r["run"], r["speedup_fwd"]) for r in merged["rows"]}
    assert by_key == {(16, 16): ("c", 3.0), (16, 32): ("b", 2.0), (8192, 64): ("c", 4.0)}
    assert merged["merged_from"] == ["c", "b"]  # a's rows were all replaced: a and its note are gone
    assert merged["note"] == "Merged runs (column 'run'). [c] from c"


def test_a_merged_run_whose_rows_remain_keeps_its_note(tmp_path):
    a = write(tmp_path / "a.json", [row(16, 16, 1.0), row(16, 32, 1.1)], note="from a")
    first = tmp_path / "first.json"
    first.write_text(json.dumps(make_table.merge([a, write(tmp_path / "b.json", [row(16, 32, 2.0)])])))
    merged = make_table.merge([first, write(tmp_path / "c.json", [row(8192, 64, 4.0)], note="from c")])
    assert merged["merged_from"] == ["a", "b", "c"]
    assert merged["note"] == "Merged runs (column 'run'). [a] from a [c] from c"
