"""End-to-end training step time and peak memory, sparse vs dense, with the TopologyOptimizer running;
and the weight + optimizer memory of the sparse layers against density (SC-003, SC-007, issue 4's < 2%).

    python benchmarks/bench_training.py                       # 12 layers, hidden 2048, MLP 8192, bf16, compiled
    python benchmarks/bench_training.py --layers 2 --hidden 256 --mlp 1024 --vocab 512 --seq 64 --device cpu --no-compile

Per block size: (1) the sparse model with plain AdamW, (2) the TopologyOptimizer with decisions out
of the window (Level 0 scoring and Level 1 only), (3) the same optimizer deciding every
``--update-every`` steps inside the window. Scoring = (2) - (1); Level 2 = (3) - (2), also read from
the decision records. Writes ``benchmarks/results/training-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sparsify import TopologyConfig, TopologyOptimizer, sparse_layers, sparsify
from sparsify.ops import backend_name


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--mlp", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--block-sizes", type=int, nargs="+", default=[64, 16])
    p.add_argument("--mem-densities", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--mem-layers", type=int, default=2, help="layers of the model used for the memory table")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--update-every", type=int, default=5)
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--out", default="benchmarks/results")
    return p.parse_args(argv)


def build(args, density: float | None, block_size: int, layers: int | None = None):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.mlp,
                         num_hidden_layers=layers or args.layers, num_attention_heads=max(1, args.hidden // 128),
                         num_key_value_heads=max(1, args.hidden // 128), max_position_embeddings=args.seq)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    with torch.device(args.device):
        model = LlamaForCausalLM(config).to(dtype)
    if density is not None:
        sparsify(model, components="mlp", density=density, block_size=block_size, init="random", seed=0)
    return model


def compile_layers(model, args) -> None:
    if not args.no_compile:
        for layer in model.model.layers:  # regional compilation: one graph reused by identical layers
            layer.compile()


def _sync(args):
    if args.device == "cuda":
        torch.cuda.synchronize()


def time_steps(model, opt, args, x, steps: int | None = None) -> dict:
    def step():
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    _sync(args)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps or args.steps):
        start = time.perf_counter()
        step()
        _sync(args)  # per-step host timing after a sync: the Level 2 host work is inside it
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan")
    ms = statistics.median(times) * 1e3
    return {"step_ms": ms, "mean_ms": statistics.mean(times) * 1e3, "tokens_per_s": x.numel() / (ms / 1e3),
            "peak_gib": peak}


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)


def _enable_probes(model) -> None:
    for _, layer in sparse_layers(model):
        layer.stats_probe.requires_grad_(True)


def speed(args, x, save) -> tuple[list[dict], list[dict]]:
    """Dense, then per block size: plain AdamW, scoring only, deciding. All three sparse runs share one
    compiled graph (the stats probe is on in each, so the graph is the same); the probe's own cost in the
    backward is measured separately in eager mode (probe off vs on)."""
    rows, topo = [], []
    model = build(args, None, 16)
    compile_layers(model, args)
    dense = time_steps(model, adamw(model), args, x)
    rows.append({"label": "dense", **dense})
    save(rows, topo)
    print(f"dense: {dense['step_ms']:.1f} ms/step, peak {dense['peak_gib']:.2f} GiB", flush=True)
    del model
    for block in args.block_sizes:
        model = build(args, args.density, block)
        eager_off = time_steps(model, adamw(model), args, x, steps=max(3, args.steps // 3))
        _enable_probes(model)
        eager_on = time_steps(model, adamw(model), args, x, steps=max(3, args.steps // 3))
        compile_layers(model, args)
        plain = time_steps(model, adamw(model), args, x)
        opt = TopologyOptimizer(adamw(model), model, TopologyConfig(update_every=10**9, score_every=10))
        scoring = time_steps(model, opt, args, x)
        opt.config.update_every = args.update_every
        opt.history.clear()
        deciding = time_steps(model, opt, args, x)
        decisions = sorted({d.step for d in opt.history})
        level2_s = sum(d.seconds for d in opt.history) / max(1, len(decisions))
        step_s = scoring["mean_ms"] / 1e3
        probe = max(0.0, (eager_on["mean_ms"] - eager_off["mean_ms"]) / eager_on["mean_ms"])
        for label, r in ((f"sparse b{block} AdamW (probe on)", plain), (f"sparse b{block} topology scoring", scoring),
                         (f"sparse b{block} topology deciding every {args.update_every}", deciding)):
            rows.append({"label": label, **r, "speedup": dense["step_ms"] / r["step_ms"]})
        scoring_fraction = (scoring["mean_ms"] - plain["mean_ms"]) / scoring["mean_ms"]
        topo.append({
            "block_size": block, "decisions_in_window": len(decisions),
            "swaps_in_window": sum(d.num_swaps for d in opt.history),
            "probe_fraction_eager": probe, "eager_step_ms_probe_off_on": [eager_off["step_ms"], eager_on["step_ms"]],
            "scoring_fraction": scoring_fraction,
            "level2_fraction_measured": (deciding["mean_ms"] - scoring["mean_ms"]) / deciding["mean_ms"],
            "level2_seconds_per_decision": level2_s,
            "overhead_fraction_at_update_every_100": probe + scoring_fraction + level2_s / (100 * step_s),
        })
        save(rows, topo)
        print(f"b{block}: plain {plain['step_ms']:.1f} / scoring {scoring['step_ms']:.1f} / deciding "
              f"{deciding['step_ms']:.1f} ms; {len(decisions)} decisions, {level2_s * 1e3:.1f} ms each; "
              f"probe {100 * probe:.2f}% (eager)", flush=True)
        del model, opt
    return rows, topo


def state_bytes(model, opt, dense_names: set[str] | None = None) -> int:
    """Bytes of the MLP weights (sparse values + indices, or dense weights) and their optimizer state."""
    total = 0
    for name, module in model.named_modules():
        if not re.search(r"mlp\.(gate|up|down)_proj$", name):
            continue
        tensors = [module.values, module.col_indices] if hasattr(module, "values") else [module.weight]
        params = [module.values] if hasattr(module, "values") else [module.weight]
        total += sum(t.numel() * t.element_size() for t in tensors)
        for p in params:
            total += sum(s.numel() * s.element_size() for s in opt.state[p].values() if torch.is_tensor(s) and s.dim())
    return total


def memory(args, x) -> list[dict]:
    out = []
    for density in [None, *args.mem_densities]:
        model = build(args, density, 16, layers=args.mem_layers)
        opt = adamw(model)
        model(input_ids=x, labels=x, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(args)
        out.append({"density": 1.0 if density is None else density, "bytes": state_bytes(model, opt),
                    "allocated_gib": torch.cuda.memory_allocated() / 2**30 if args.device == "cuda" else float("nan")})
        del model, opt
        if args.device == "cuda":
            torch.cuda.empty_cache()
    for row in out:
        row["ratio"] = row["bytes"] / out[0]["bytes"]
    return out


def main(argv=None) -> dict:
    args = parse(argv)
    import triton  # noqa: F401  (its version goes into the record)

    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    started = time.time()
    today = datetime.date.today().isoformat()
    path = Path(args.out) / f"training-{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-').lower()}-{today}.json"
    record = {
        "device": name, "date": today, "torch": torch.__version__, "triton": triton.__version__,
        "backend": backend_name(device), "compiled": not args.no_compile, "config": vars(args),
        "steps": [], "topology": [], "memory": [],
    }

    def save(rows=None, topo=None, mem=None):  # after every part, so a run cut short keeps what it measured
        record.update({k: v for k, v in (("steps", rows), ("topology", topo), ("memory", mem)) if v is not None})
        record["seconds"] = time.time() - started
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1))

    mem = memory(args, x[: max(1, args.batch // 4)])
    save(mem=mem)
    rows, topo = speed(args, x, save)
    for r in rows:
        print(f"{r['label']:<45} {r['step_ms']:8.1f} ms  {r['tokens_per_s']:10.0f} tok/s  peak {r['peak_gib']:.2f} GiB"
              + (f"  {r['speedup']:.2f}x" if "speedup" in r else ""))
    for t in topo:
        print(f"b{t['block_size']}: scoring {100 * t['scoring_fraction']:.2f}%, Level 2 measured "
              f"{100 * t['level2_fraction_measured']:.2f}%, overhead at update_every=100 "
              f"{100 * t['overhead_fraction_at_update_every_100']:.2f}%")
    for m in mem:
        print(f"density {m['density']:.2f}: MLP weights + AdamW state {m['bytes'] / 2**20:.1f} MiB ({m['ratio']:.3f} of dense)")
    print("->", path)
    return record


if __name__ == "__main__":
    main()
