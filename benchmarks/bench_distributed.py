"""Sparse training on several GPUs: dense vs sparse, 1 vs N GPUs, DDP and FSDP2, eager and compiled.

    torchrun --nproc-per-node N benchmarks/bench_distributed.py                   # 12 x (2048, MLP 8192), bf16, NCCL
    torchrun --nproc-per-node N benchmarks/bench_distributed.py --compile         # the same under torch.compile
    torchrun --nproc-per-node 2 benchmarks/bench_distributed.py --device cpu --tiny   # gloo smoke test

A Llama-style model with every MLP linear sparse (``--block-sizes``, density 0.5 by default), trained with
AdamW, eagerly or compiled (``--execution eager compiled compiled-layers``: the whole wrapped model, or
every decoder layer, which compiles one graph for all of them; ``--compile`` = compiled only). Any world size
N: rank 0 first trains alone (the 1-GPU baseline, the other ranks wait), then all N ranks train under DDP
and under FSDP2 (``fully_shard`` on every decoder layer and the root). Each rank gets its own batch of
``--batch`` x ``--seq`` tokens (weak scaling).

What the sparse model trains with (``--topology``): ``decide`` (the TopologyOptimizer, deciding every
``--update-every`` steps inside the timed window), ``stats`` (the TopologyOptimizer collecting its per-step
statistics but deciding after the window: no Level 2 collective is timed) and ``off`` (plain AdamW, a fixed
topology: no probes, no statistics). DDP runs with ``broadcast_buffers`` on (DDP's default: every forward
broadcasts every buffer, ``col_indices`` and the stats probes included) and / or off
(``--broadcast-buffers on off``). Together they split the sparse model's DDP overhead into the layers'
own cost, the per-step statistics, the per-forward buffer broadcast and the Level 2 collectives.

Per run: tokens/s over all ranks (median step), scaling efficiency = tokens/s / (N x tokens/s of the same
variant on 1 GPU), the host time of a step (until ``zero_grad`` returns, before the device sync: close to
the step time means the step is bound by the host), peak memory of every rank, the milliseconds per step
spent in the topology optimizer's collectives (the bucketed all-reduce of the statistics and the checksum,
timed between device syncs), for compiled runs the first step's seconds and the number of graphs, and, at
the end, every rank's number of topology decisions and swaps, its topology checksum and a digest of every
sparse layer's block values (under FSDP2 the full, all-gathered tensor): a SHA-256 of the bytes plus a
float64 sum. Both must agree across ranks ("same topology", "same values"). Writes
``benchmarks/results/distributed-<device>-<N>x-<date>.json`` (devices, versions, configuration) and prints
a table.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import os
import re
import statistics
import time
from pathlib import Path

import torch
import torch._dynamo
import torch.distributed as dist
from tabulate import tabulate

from sparsify import BlockSparseLinear, TopologyConfig, TopologyOptimizer, sparsify
from sparsify.topology import optimizer as topology_optimizer
from sparsify.topology import scores as topology_scores
from sparsify.topology.distributed import topology_checksum
from sparsify.topology.fsdp import is_sharded


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--mlp", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=4, help="sequences per rank and step")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--block-sizes", type=int, nargs="+", default=[64], help="one sparse model per block size")
    p.add_argument("--models", nargs="+", default=["dense", "sparse"], choices=["dense", "sparse"])
    p.add_argument("--topology", nargs="+", default=["decide"], choices=["decide", "stats", "off"],
                   help="what the sparse model trains with (see above)")
    p.add_argument("--broadcast-buffers", nargs="+", default=["on"], choices=["on", "off"], help="DDP's setting")
    p.add_argument("--execution", nargs="+", default=["eager"], choices=["eager", "compiled", "compiled-layers"],
                   help="compiled: torch.compile of the whole wrapped model (under DDP split at the gradient "
                        "buckets); compiled-layers: of every decoder layer (one graph all layers share)")
    p.add_argument("--compile", action="store_true", help="compiled runs only (= --execution compiled)")
    p.add_argument("--compile-backend", default=None, help="default: inductor on CUDA, aot_eager on the CPU")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--update-every", type=int, default=5)
    p.add_argument("--modes", nargs="+", default=["single", "ddp", "fsdp"], choices=["single", "ddp", "fsdp"])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--tiny", action="store_true", help="a 2-layer toy model and 3 steps: a smoke test of the script")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    if args.tiny:
        args.layers, args.hidden, args.mlp, args.vocab, args.batch, args.seq = 2, 64, 256, 128, 2, 32
        args.block_sizes, args.steps, args.warmup, args.update_every = [16], 4, 1, 2
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.compile:
        args.execution = ["compiled"]
    # inductor compiles C++ for every graph on the CPU (minutes); aot_eager traces the same graphs, runs them eagerly
    args.compile_backend = args.compile_backend or ("inductor" if args.device == "cuda" else "aot_eager")
    return args


def build(args, block_size: int | None):
    """A fresh copy of the model on ``args.torch_device``: built (and sparsified) once per block size on the
    CPU in fp32, then deep-copied for every run (building a 12-layer model costs seconds, a copy less)."""
    key = (block_size, args.layers, args.hidden, args.mlp, args.vocab, args.density)
    if key not in _BUILT:
        _BUILT[key] = _build_on_cpu(args, block_size)
    return copy.deepcopy(_BUILT[key]).to(device=args.torch_device, dtype=getattr(torch, args.dtype))


_BUILT: dict = {}


def _build_on_cpu(args, block_size: int | None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # the same initial model on every rank
    heads = max(1, args.hidden // 128)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.mlp,
                         num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=args.seq, use_cache=False)
    model = LlamaForCausalLM(config)
    if block_size:  # sparsify on the CPU in fp32, then move: the order the docs prescribe
        sparsify(model, components="mlp", density=args.density, block_size=block_size, init="random", seed=0)
    return model


class CollectiveTimer:
    """Wall time of the topology optimizer's collectives (between device syncs, so it is their own)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds, self.calls = device, 0.0, 0
        self._originals = {}

    def __enter__(self):
        # each collective, patched where the topology code looks it up
        for module, name in ((topology_scores, "reduce_"), (topology_optimizer, "check_same_topology")):
            original = getattr(module, name)
            self._originals[module, name] = original
            setattr(module, name, self._timed(original))
        return self

    def __exit__(self, *exc) -> None:
        for (module, name), original in self._originals.items():
            setattr(module, name, original)

    def _timed(self, fn):
        def timed(*args, **kwargs):
            _sync(self.device)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            _sync(self.device)
            self.seconds += time.perf_counter() - start
            self.calls += 1
            return out
        return timed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def values_digest(layers: dict) -> dict:
    """A digest of every sparse layer's block values on this rank, in name order: a SHA-256 of the raw
    bytes (equal digests = bitwise equal values) and a float64 sum (readable). Under FSDP2 the full
    tensor is all-gathered (``full_tensor()``), so every rank must call this, in the same order."""
    sha, total = hashlib.sha256(), 0.0
    for name in sorted(layers):
        values = layers[name].values.detach()
        full = values.full_tensor() if is_sharded(values) else values
        host = full.contiguous().cpu()
        sha.update(name.encode())
        sha.update(str((tuple(host.shape), host.dtype)).encode())
        sha.update(host.view(-1).view(torch.uint8).numpy().tobytes())  # bf16 has no numpy dtype: its bytes
        total += float(host.double().sum())
        del full, host
    return {"sha256": sha.hexdigest(), "float64_sum": total}


def variants(args) -> list[dict]:
    """Every (model, block size, topology, execution, DDP buffer broadcast) to run, dense first."""
    out = []
    for execution in args.execution:
        models = ([(None, "-")] if "dense" in args.models else []) + (
            [(b, t) for b in args.block_sizes for t in args.topology] if "sparse" in args.models else [])
        for block_size, topology in models:
            for mode in args.modes:
                for broadcast in args.broadcast_buffers if mode == "ddp" else ["-"]:
                    out.append({"model": "sparse" if block_size else "dense", "block_size": block_size,
                                "topology": topology, "execution": execution, "mode": mode,
                                "broadcast_buffers": broadcast})
    return out


def wrap(args, model, variant: dict, group):
    """``model`` under DDP or FSDP2 over ``group`` (as it is for a single run)."""
    device = args.torch_device
    if variant["mode"] == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, process_group=group, device_ids=device_ids,
                                       broadcast_buffers=variant["broadcast_buffers"] == "on")
    if variant["mode"] == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # an explicit mesh on args.device: fully_shard's default mesh is on the accelerator whenever the
        # machine has one, which would move a --device cpu (gloo) run onto a GPU
        mesh = init_device_mesh(device.type, (dist.get_world_size(group),))
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def compiled_forward(args, model, execution: str, graphs: list):
    """What to call for a forward: ``model`` itself (eager), ``torch.compile(model)`` ("compiled"), or
    ``model`` with every decoder layer compiled in place ("compiled-layers"); ``graphs`` collects the
    size of every graph the backend compiles (under DDP, "compiled" is one per gradient-bucket split)."""
    if execution == "eager":
        return model
    from torch._dynamo.backends.registry import lookup_backend

    torch._dynamo.reset()  # graphs of the previous variant: not counted, not reused

    def counting_backend(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return lookup_backend(args.compile_backend)(gm, example_inputs)

    if execution == "compiled":
        return torch.compile(model, backend=counting_backend)
    # in place, inside DDP / FSDP2: the layers stay the same modules; one graph serves every layer
    inner = model.module if hasattr(model, "module") else model
    for block in inner.model.layers:
        block.compile(backend=counting_backend)
    return model


def run(args, variant: dict, group, ids: torch.Tensor) -> dict:
    """Train one variant on this rank (``group``: this rank alone for "single") and time it."""
    device = args.torch_device
    sparse, topology = variant["model"] == "sparse", variant["topology"]
    model = wrap(args, build(args, variant["block_size"]), variant, group)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    if sparse and topology != "off":
        window = args.warmup + args.steps
        every = args.update_every if topology == "decide" else window + 1  # "stats": no decision in the window
        config = TopologyConfig(update_every=every, score_every=max(1, args.update_every // 2))
        opt = TopologyOptimizer(opt, model, config, process_group=group)  # before compiling: it turns the probes on
    graphs = []  # the sizes of the graphs compiled, in order
    forward = compiled_forward(args, model, variant["execution"], graphs)
    timer = CollectiveTimer(device)
    times, host = [], []
    with timer:
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                _sync(device)
                timer.seconds, timer.calls = 0.0, 0
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            forward(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            host.append(time.perf_counter() - start)
            _sync(device)
            times.append(time.perf_counter() - start)
            if step == 0:
                warm_graphs = len(graphs)
    first_step_s = times[0]
    times, host = times[args.warmup :], host[args.warmup :]
    world = 1 if variant["mode"] == "single" else dist.get_world_size(group)
    step_s = statistics.median(times)
    out = {
        **variant, "gpus": world, "step_ms": step_s * 1e3, "host_ms": statistics.median(host) * 1e3,
        "step_ms_max": max(times) * 1e3, "first_step_s": first_step_s, "tokens_per_s": world * ids.numel() / step_s,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan"),
        "topology_collective_ms_per_step": 1e3 * timer.seconds / len(times),
        "topology_collective_calls": timer.calls,
    }
    if graphs:
        out["compiled_graphs"], out["compile_backend"] = len(graphs), args.compile_backend
        out["graphs_compiled_after_first_step"] = len(graphs) - warm_graphs  # recompiles: 0 expected
    if sparse:
        history = getattr(opt, "history", [])
        layers = {n: m for n, m in model.named_modules() if isinstance(m, BlockSparseLinear)}
        out["decisions"] = len({d.step for d in history})
        out["swaps"] = sum(d.num_swaps for d in history)
        sums = torch.stack([topology_checksum(layers[n].col_indices) for n in sorted(layers)])
        out["checksum"] = int((sums * torch.arange(1, len(sums) + 1, device=sums.device)).sum())
        out["values_digest"] = values_digest(layers)
    del model, opt, forward
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def gather_rows(row: dict | None, world: int) -> dict | None:
    """On rank 0: its own row plus every rank's peak memory, collective time, topology and values."""
    gathered = [None] * world
    dist.all_gather_object(gathered, row)
    if dist.get_rank() != 0:
        return None
    mine = gathered[0]
    if mine["mode"] != "single":
        for key in ("peak_gib", "topology_collective_ms_per_step", "step_ms", "host_ms"):
            mine[f"{key}_per_rank"] = [g[key] for g in gathered]
        if mine["model"] == "sparse":
            mine["checksum_per_rank"] = [g["checksum"] for g in gathered]
            mine["same_topology_on_every_rank"] = len(set(mine["checksum_per_rank"])) == 1
            mine["values_digest_per_rank"] = [g["values_digest"] for g in gathered]
            mine["same_values_on_every_rank"] = len({d["sha256"] for d in mine["values_digest_per_rank"]}) == 1
            mine["decisions_per_rank"] = [g["decisions"] for g in gathered]
            mine["swaps_per_rank"] = [g["swaps"] for g in gathered]
    return mine


def describe(r: dict) -> str:
    name = r["model"] + (f" B={r['block_size']} topology {r['topology']}" if r["model"] == "sparse" else "")
    bcast = f" broadcast_buffers {r['broadcast_buffers']}" if r["mode"] == "ddp" else ""
    line = (f"{name} {r['execution']} {r['mode']}{bcast}: {r['step_ms']:.1f} ms/step (host {r['host_ms']:.1f}),"
            f" {r['tokens_per_s']:.0f} tok/s")
    if "values_digest_per_rank" in r:
        digests = r["values_digest_per_rank"]
        line += (f", after {r['decisions_per_rank']} topology decisions ({r['swaps_per_rank']} swaps)"
                 f" per rank: topology checksums {r['checksum_per_rank']}"
                 f" (same: {r['same_topology_on_every_rank']}),"
                 f" values sha256 {[d['sha256'][:16] for d in digests]}"
                 f" float64 sums {[d['float64_sum'] for d in digests]}"
                 f" (same: {r['same_values_on_every_rank']})")
    return line


def add_scaling(rows: list[dict]) -> None:
    """Scaling efficiency of every row against the 1-GPU run of the same model, topology and execution."""
    same = ("model", "block_size", "topology", "execution")
    for r in rows:
        base = next((b for b in rows if b["mode"] == "single" and all(b[k] == r[k] for k in same)), None)
        r["scaling_efficiency"] = r["tokens_per_s"] / (r["gpus"] * base["tokens_per_s"]) if base else None


def versions() -> dict:
    out = {"torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available() and dist.is_nccl_available():
        try:
            version = torch.cuda.nccl.version()
            out["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        except (RuntimeError, AttributeError):  # a build without NCCL's version symbol
            out["nccl"] = None
    for name in ("transformers", "triton"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def write_record(args, rows: list[dict], backend: str, devices: list[str], table: bool = True) -> dict:
    """Write the results JSON (again after every run, so a run cut short keeps what it measured); with
    ``table``, print the table. ``devices``: every rank's device name, in rank order."""
    world = len(devices)
    today = datetime.date.today().isoformat()
    record = {
        "devices": devices, "world_size": world, "backend": backend, "date": today, "versions": versions(),
        "config": {k: v for k, v in vars(args).items() if k != "torch_device"}, "runs": rows,
    }
    tag = re.sub(r"[^A-Za-z0-9]+", "-", devices[0]).strip("-").lower() + f"-{world}x" + ("-tiny" if args.tiny else "")
    path = Path(args.out) / f"distributed-{tag}-{today}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    if not table:
        return record
    yes_no = {True: "yes", False: "NO"}
    table = [[r["model"], r["block_size"] or "", r["topology"], r["execution"], r["mode"], r["broadcast_buffers"],
              r["gpus"], f"{r['step_ms']:.1f}", f"{r['host_ms']:.1f}", f"{r['tokens_per_s']:.0f}",
              "" if r["scaling_efficiency"] is None else f"{r['scaling_efficiency']:.2f}",
              " / ".join(f"{g:.2f}" for g in r.get("peak_gib_per_rank", [r["peak_gib"]])),
              f"{r['topology_collective_ms_per_step']:.2f}",
              yes_no.get(r.get("same_topology_on_every_rank"), ""), yes_no.get(r.get("same_values_on_every_rank"), "")]
             for r in rows]
    print(tabulate(table, headers=["model", "B", "topology", "execution", "mode", "bcast", "GPUs", "ms/step",
                                   "host ms", "tokens/s", "scaling", "peak GiB per rank", "topology coll. ms/step",
                                   "same topology", "same values"]))
    print("->", path)
    return record


def main(argv=None) -> dict:
    args = parse(argv)
    backend = "nccl" if args.device == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local_rank)
        args.torch_device = torch.device("cuda", local_rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        args.torch_device = torch.device("cpu")
    devices = [None] * world  # every rank's device, by name
    dist.all_gather_object(devices, torch.cuda.get_device_name(args.torch_device) if args.device == "cuda" else "cpu")
    group = dist.group.WORLD
    solo = dist.new_group([0])  # rank 0 alone: the 1-GPU baseline (every rank must create it)
    gen = torch.Generator().manual_seed(1000 + rank)  # different data on every rank
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(args.torch_device)

    rows = []
    for variant in variants(args):
        if variant["mode"] == "single":
            row = run(args, variant, solo, ids) if rank == 0 else None
            dist.barrier()
        else:
            row = run(args, variant, group, ids)
        mine = gather_rows(row, world)
        if rank == 0:
            rows.append(mine)
            print(describe(mine), flush=True)
            add_scaling(rows)
            write_record(args, rows, backend, devices, table=False)

    record = write_record(args, rows, backend, devices) if rank == 0 else None
    dist.barrier()
    dist.destroy_process_group()
    return record


if __name__ == "__main__":
    main()
