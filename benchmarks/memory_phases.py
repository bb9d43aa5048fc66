"""Where a training step's memory goes, sparse against dense (GPU): the bench_training.py model, one
process per configuration, memory read per phase of one step, and what is live at the step's peak.

    python benchmarks/memory_phases.py --out DIR                       # dense, then sparse B = 64 and 16
    python benchmarks/memory_phases.py --block-sizes 128 --sequence    # also bench_training's phase order

Per configuration (fresh model, compiled like bench_training, AdamW; ``--warmup`` steps first so that
compiling and autotuning are done): allocated memory before the step, and per phase (forward + loss,
backward, optimizer step, zero_grad) the allocated memory after it and the peak inside it. Then one
more step with the CUDA caching allocator's history recorded: the allocations live at the step's peak,
grouped by the first frame in sparsify/ (else the innermost Python frame), largest first.

``--sequence`` repeats bench_training.speed()'s order on one sparse model (eager probe off / on,
compiled probe off / on, a fresh AdamW each) and reads memory_allocated() before each part, with and
without a gc.collect(): a part that starts higher than the one before holds something it should not.
Writes memory-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import pathlib
import re
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import bench_training as bt  # noqa: E402  (benchmarks/ is the script's folder)

GIB = 2**30


def _gib(n: float) -> float:
    return round(n / GIB, 4)


def phases(model, opt, x) -> dict:
    """Allocated memory after, and peak inside, each phase of one step."""
    out = {}
    torch.cuda.synchronize()
    out["start_gib"] = _gib(torch.cuda.memory_allocated())
    state = {}

    def mark(name, fn):
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        torch.cuda.synchronize()
        out[name] = {"after_gib": _gib(torch.cuda.memory_allocated()), "peak_gib": _gib(torch.cuda.max_memory_allocated())}
        return result

    state["loss"] = mark("forward", lambda: model(input_ids=x, labels=x, use_cache=False).loss)
    mark("backward", lambda: state.pop("loss").backward())
    mark("optimizer", opt.step)
    mark("zero_grad", lambda: opt.zero_grad(set_to_none=True))
    out["step_peak_gib"] = max(v["peak_gib"] for v in out.values() if isinstance(v, dict))
    return out


def _frame_key(frames: list) -> str:
    for f in frames:
        if "sparsify/" in f["filename"] and "benchmarks/" not in f["filename"]:
            return f"{f['filename'].split('sparsify/', 1)[1]}:{f['line']} {f['name']}"
    for f in frames:
        if f["filename"].endswith(".py") and "/torch/" not in f["filename"]:
            return f"{pathlib.Path(f['filename']).name}:{f['line']} {f['name']}"
    return f"{frames[0]['filename']}:{frames[0]['line']} {frames[0]['name']}" if frames else "?"


def live_at_peak(model, opt, x, top: int = 25) -> dict:
    """One step with the allocator history on: the blocks live when the allocated total peaks."""
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=500_000)
    try:
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        del loss
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    # the blocks live at the end (segments), then this step's events undone from the last: what was live before it
    live = {}
    for seg in snapshot["segments"]:
        addr = seg["address"]
        for block in seg["blocks"]:
            if block["state"] == "active_allocated":
                live[addr] = (block["size"], "live before the step (weights, optimizer state, ...)")
            addr += block["size"]
    traces = snapshot["device_traces"][torch.cuda.current_device()]
    for event in reversed(traces):
        if event["action"] == "alloc":
            live.pop(event["addr"], None)
        elif event["action"] == "free_completed":
            live[event["addr"]] = (event["size"], _frame_key(event.get("frames", [])))
    total = sum(s for s, _ in live.values())
    peak, at_peak, names = total, dict(live), {}
    for event in traces:
        if event["action"] == "alloc":
            live[event["addr"]] = (event["size"], _frame_key(event.get("frames", [])))
            total += event["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif event["action"] == "free_completed" and event["addr"] in live:
            total -= live.pop(event["addr"])[0]
    for size, key in at_peak.values():
        names[key] = names.get(key, 0) + size
    ranked = sorted(names.items(), key=lambda kv: -kv[1])[:top]
    return {"peak_gib": _gib(peak), "live_at_peak": [{"where": k, "gib": _gib(v)} for k, v in ranked]}


def configuration(args, density, block) -> dict:
    model = bt.build(args, density, block)
    if density is not None:
        bt._set_probes(model, True)  # as under the TopologyOptimizer
    bt.compile_layers(model, args)
    opt = bt.adamw(model)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).cuda()
    for _ in range(args.warmup):
        model(input_ids=x, labels=x, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    gc.collect()
    result = {"label": "dense" if density is None else f"sparse b{block}", "phases": phases(model, opt, x)}
    try:
        result["history"] = live_at_peak(model, opt, x)
    except Exception as error:  # noqa: BLE001  (the phases above still stand)
        result["history_error"] = f"{type(error).__name__}: {str(error)[:300]}"
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    result.update(params_gib=_gib(weights), optimizer_state_gib=_gib(state))
    del model, opt
    gc.collect()
    torch.cuda.empty_cache()
    return result


def sequence(args, block) -> list[dict]:
    """bench_training.speed()'s order of parts on one sparse model: memory before each part."""
    out = []
    model = bt.build(args, args.density, block)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).cuda()

    def part(label, fn):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        r = fn()
        torch.cuda.synchronize()
        entering = torch.cuda.memory_allocated()
        gc.collect()
        out.append({"part": label, "allocated_before_gib": _gib(before), "allocated_after_gib": _gib(entering),
                    "after_gc_gib": _gib(torch.cuda.memory_allocated()), "peak_gib": r["peak_gib"]})

    short = max(3, args.steps // 3)
    part("eager probe off", lambda: bt.time_steps(model, bt.adamw(model), args, x, steps=short))
    bt._set_probes(model, True)
    part("eager probe on", lambda: bt.time_steps(model, bt.adamw(model), args, x, steps=short))
    bt.compile_layers(model, args)
    bt._set_probes(model, False)
    part("compiled probe off", lambda: bt.time_steps(model, bt.adamw(model), args, x))
    bt._set_probes(model, True)
    part("compiled probe on (bench_training's 'AdamW (probe on)')", lambda: bt.time_steps(model, bt.adamw(model), args, x))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--block-sizes", type=int, nargs="+", default=[64, 16])
    p.add_argument("--no-dense", action="store_true")
    p.add_argument("--sequence", action="store_true")
    p.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    own, rest = p.parse_known_args(argv)
    args = bt.parse(rest + ["--steps", "6", "--warmup", "3"] if "--steps" not in rest else rest)
    name = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-").lower()
    today = datetime.date.today().isoformat()
    path = pathlib.Path(own.out) / f"memory-{name}-{today}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"device": torch.cuda.get_device_name(), "date": today, "torch": torch.__version__,
              "config": vars(args), "configurations": [], "sequence": {}}
    runs = ([] if own.no_dense else [(None, 16)]) + [(args.density, b) for b in own.block_sizes]
    for density, block in runs:
        r = configuration(args, density, block)
        record["configurations"].append(r)
        path.write_text(json.dumps(record, indent=1))
        ph = r["phases"]
        print(f"{r['label']}: start {ph['start_gib']:.2f} GiB, peaks fwd {ph['forward']['peak_gib']:.2f} bwd "
              f"{ph['backward']['peak_gib']:.2f} opt {ph['optimizer']['peak_gib']:.2f} GiB; params "
              f"{r['params_gib']:.2f}, AdamW state {r['optimizer_state_gib']:.2f} GiB", flush=True)
        for item in r.get("history", {}).get("live_at_peak", [])[:12]:
            print(f"    {item['gib']:7.3f} GiB  {item['where']}")
    if own.sequence:
        for block in own.block_sizes:
            record["sequence"][str(block)] = sequence(args, block)
            path.write_text(json.dumps(record, indent=1))
            for s in record["sequence"][str(block)]:
                print(f"b{block} {s['part']}: before {s['allocated_before_gib']:.2f} after {s['allocated_after_gib']:.2f} "
                      f"after gc {s['after_gc_gib']:.2f} peak {s['peak_gib']:.2f} GiB", flush=True)
    print("->", path)


if __name__ == "__main__":
    main()
