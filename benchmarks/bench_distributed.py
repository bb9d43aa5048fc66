"""Sparse training on several GPUs: dense vs sparse, 1 vs N GPUs, DDP and FSDP2.

    torchrun --nproc-per-node 2 benchmarks/bench_distributed.py                  # 12 x (2048, MLP 8192), bf16, NCCL
    torchrun --nproc-per-node 2 benchmarks/bench_distributed.py --device cpu --tiny   # gloo smoke test

A Llama-style model with every MLP linear sparse (block size 64, density 0.5 by default), trained in
eager mode with AdamW; the sparse runs use the TopologyOptimizer deciding every ``--update-every``
steps inside the timed window. Rank 0 first trains alone (the 1-GPU baseline, the other ranks wait),
then all ranks train under DDP and under FSDP2 (``fully_shard`` on every decoder layer and the root).
Each rank gets its own batch of ``--batch`` x ``--seq`` tokens (weak scaling).

Per run: tokens/s over all ranks (median step), scaling efficiency = tokens/s / (N x tokens/s on 1 GPU),
peak memory of every rank, the seconds per step spent in the topology optimizer's collectives (the
bucketed all-reduce of the statistics and the checksum, timed between device syncs), and, at the end,
every rank's number of topology decisions and swaps, its topology checksum and a digest of every sparse
layer's block values (under FSDP2 the full, all-gathered tensor): a SHA-256 of the bytes plus a float64
sum. Both must agree across ranks ("same topology", "same values"). Writes
``benchmarks/results/distributed-<device>-<date>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tabulate import tabulate

from sparsify import TopologyConfig, TopologyOptimizer, sparsify
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
    p.add_argument("--block-size", type=int, default=64)
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
        args.block_size, args.steps, args.warmup, args.update_every = 16, 4, 1, 2
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    return args


def build(args, sparse: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # the same initial model on every rank
    heads = max(1, args.hidden // 128)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.mlp,
                         num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=args.seq, use_cache=False)
    model = LlamaForCausalLM(config)
    if sparse:  # sparsify on the CPU in fp32, then move: the order the docs prescribe
        sparsify(model, components="mlp", density=args.density, block_size=args.block_size, init="random", seed=0)
    return model.to(device=args.torch_device, dtype=getattr(torch, args.dtype))


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


def run(args, mode: str, sparse: bool, group, ids: torch.Tensor) -> dict:
    """Train ``mode`` ("single": this process alone; "ddp"; "fsdp") and time it on this rank."""
    from torch.nn.parallel import DistributedDataParallel

    device = args.torch_device
    model = build(args, sparse)
    if mode == "ddp":
        device_ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(model, process_group=group, device_ids=device_ids)
    elif mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # an explicit mesh on args.device: fully_shard's default mesh is on the accelerator whenever the
        # machine has one, which would move a --device cpu (gloo) run onto a GPU
        mesh = init_device_mesh(device.type, (dist.get_world_size(group),))
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    if sparse:
        config = TopologyConfig(update_every=args.update_every, score_every=max(1, args.update_every // 2))
        opt = TopologyOptimizer(opt, model, config, process_group=group)
    timer = CollectiveTimer(device)
    times = []
    with timer:
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                _sync(device)
                timer.seconds, timer.calls = 0.0, 0
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            times.append(time.perf_counter() - start)
    times = times[args.warmup :]
    world = 1 if mode == "single" else dist.get_world_size(group)
    step_s = statistics.median(times)
    out = {
        "mode": mode, "model": "sparse" if sparse else "dense", "gpus": world, "step_ms": step_s * 1e3,
        "tokens_per_s": world * ids.numel() / step_s,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan"),
        "topology_collective_ms_per_step": 1e3 * timer.seconds / len(times) if sparse else 0.0,
        "topology_collective_calls": timer.calls,
    }
    if sparse:
        out["decisions"] = len({d.step for d in opt.history})
        out["swaps"] = sum(d.num_swaps for d in opt.history)
        sums = torch.stack([topology_checksum(m.col_indices) for m in opt.layers.values()])
        out["checksum"] = int((sums * torch.arange(1, len(sums) + 1, device=sums.device)).sum())
        out["values_digest"] = values_digest(opt.layers)
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


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
    group = dist.group.WORLD
    solo = dist.new_group([0])  # rank 0 alone: the 1-GPU baseline (every rank must create it)
    gen = torch.Generator().manual_seed(1000 + rank)  # different data on every rank
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(args.torch_device)

    rows = []
    for sparse in (False, True):
        for mode in args.modes:
            if mode == "single":
                row = run(args, mode, sparse, solo, ids) if rank == 0 else None
                dist.barrier()
            else:
                row = run(args, mode, sparse, group, ids)
            gathered = [None] * world
            dist.all_gather_object(gathered, row)
            if rank == 0:
                mine = gathered[0]
                if mode != "single":
                    mine["peak_gib_per_rank"] = [g["peak_gib"] for g in gathered]
                    mine["topology_collective_ms_per_step_per_rank"] = [
                        g["topology_collective_ms_per_step"] for g in gathered]
                    if sparse:
                        mine["checksum_per_rank"] = [g["checksum"] for g in gathered]
                        mine["same_topology_on_every_rank"] = len(set(mine["checksum_per_rank"])) == 1
                        mine["values_digest_per_rank"] = [g["values_digest"] for g in gathered]
                        mine["same_values_on_every_rank"] = len({d["sha256"] for d in mine["values_digest_per_rank"]}) == 1
                        mine["decisions_per_rank"] = [g["decisions"] for g in gathered]
                        mine["swaps_per_rank"] = [g["swaps"] for g in gathered]
                rows.append(mine)
                line = f"{mine['model']:>6} {mode:<6}: {mine['step_ms']:.1f} ms/step, {mine['tokens_per_s']:.0f} tok/s"
                if sparse and mode != "single":
                    digests = mine["values_digest_per_rank"]
                    line += (f", after {mine['decisions_per_rank']} topology decisions ({mine['swaps_per_rank']} swaps)"
                             f" per rank: topology checksums {mine['checksum_per_rank']}"
                             f" (same: {mine['same_topology_on_every_rank']}),"
                             f" values sha256 {[d['sha256'][:16] for d in digests]}"
                             f" float64 sums {[d['float64_sum'] for d in digests]}"
                             f" (same: {mine['same_values_on_every_rank']})")
                print(line, flush=True)

    record = None
    if rank == 0:
        for r in rows:
            base = next((b for b in rows if b["mode"] == "single" and b["model"] == r["model"]), None)
            r["scaling_efficiency"] = r["tokens_per_s"] / (r["gpus"] * base["tokens_per_s"]) if base else None
        device_name = torch.cuda.get_device_name(args.torch_device) if args.device == "cuda" else "cpu"
        today = datetime.date.today().isoformat()
        versions = {"torch": torch.__version__}
        try:
            import transformers
            versions["transformers"] = transformers.__version__
            import triton
            versions["triton"] = triton.__version__
        except ImportError:
            pass
        record = {
            "devices": [device_name] * world, "world_size": world, "backend": backend, "date": today,
            "versions": versions, "config": {k: v for k, v in vars(args).items() if k != "torch_device"}, "runs": rows,
        }
        tag = re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-").lower() + ("-tiny" if args.tiny else "")
        path = Path(args.out) / f"distributed-{tag}-{today}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1))
        table = [[r["model"], r["mode"], r["gpus"], f"{r['step_ms']:.1f}", f"{r['tokens_per_s']:.0f}",
                  "" if r["scaling_efficiency"] is None else f"{r['scaling_efficiency']:.2f}",
                  " / ".join(f"{g:.2f}" for g in r.get("peak_gib_per_rank", [r["peak_gib"]])),
                  f"{r['topology_collective_ms_per_step']:.2f}",
                  {True: "yes", False: "NO"}.get(r.get("same_topology_on_every_rank"), ""),
                  {True: "yes", False: "NO"}.get(r.get("same_values_on_every_rank"), "")]
                 for r in rows]
        print(tabulate(table, headers=["model", "mode", "GPUs", "ms/step", "tokens/s", "scaling", "peak GiB per rank",
                                       "topology coll. ms/step", "same topology",
                                       "same values"]))
        print("->", path)
    dist.barrier()
    dist.destroy_process_group()
    return record


if __name__ == "__main__":
    main()
