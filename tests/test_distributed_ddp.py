"""Two processes: DDP with different data per rank ends with one topology (and one set of values) everywhere.

By default the two ranks are CPU processes over gloo. On a machine with 2 GPUs, run them over NCCL,
rank i on cuda:i (the assertions are the same and stay bitwise; ``-s`` shows every rank's number of
topology decisions and swaps and its topology checksums)::

    SPARSIFY_TEST_DIST_DEVICE=cuda python -m pytest -q -s tests/test_distributed_ddp.py
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import free_port, init_dist_worker, print_rank_summary, require_dist_devices, to_cpu

WORLD = 2
STEPS = 13  # decisions at steps 3, 6, 9, 12, then one step of local statistics
UPDATE_EVERY = 3



def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsify import sparsify

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=128, max_position_embeddings=64,
    )
    return sparsify(LlamaForCausalLM(config), components="mlp", density=0.5, block_size=16)


def _snapshot(opt) -> dict:
    """This rank's topology, values, per-layer checksums (on its device), decisions and swaps."""
    from sparsify.topology.distributed import topology_checksum

    return {
        "col_indices": {n: m.col_indices for n, m in opt.layers.items()},
        "values": {n: m.values for n, m in opt.layers.items()},
        "checksums": {n: int(topology_checksum(m.col_indices)) for n, m in opt.layers.items()},
        "decisions": len({d.step for d in opt.history}),
        "swaps": sum(d.num_swaps for d in opt.history),
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    device = init_dist_worker(rank, WORLD, port)  # gloo on the CPU, or NCCL with this rank on cuda:rank
    device_ids = [device.index] if device.type == "cuda" else None
    try:
        from torch.nn.parallel import DistributedDataParallel

        from sparsify import TopologyConfig, TopologyOptimizer
        from sparsify.topology.distributed import check_same_topology

        # broadcast_buffers=False: nothing but the topology optimizer keeps col_indices in step across ranks
        model = DistributedDataParallel(_tiny_llama().to(device), broadcast_buffers=False, device_ids=device_ids)
        config = TopologyConfig(score_every=1, update_every=UPDATE_EVERY, epsilon=0.3, prune_fraction=0.5, swap_threshold=1.0)
        opt = TopologyOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model, config)
        assert opt.process_group is model.process_group
        data = torch.Generator().manual_seed(1000 + rank)  # different data on every rank
        for _ in range(STEPS):
            ids = torch.randint(0, 128, (2, 16), generator=data).to(device)  # drawn on the CPU: the same data on any device
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        layers = opt.layers
        local_stats = {n: s.probe_ema.clone() for n, s in opt.layer_scores.items()}
        torch.save(to_cpu({**_snapshot(opt), "probe_ema": local_stats}), os.path.join(out_dir, f"rank{rank}.pt"))

        # a topology that differs on one rank is caught by the checksum
        name, layer = next(iter(layers.items()))
        tampered = layer.col_indices.clone()
        if rank == 1:
            tampered[0] = tampered[0].flip(0)
        try:
            check_same_topology([name], [tampered], opt.process_group, step=STEPS)
            diverged = "not raised"
        except RuntimeError as error:
            diverged = str(error)
        torch.save(diverged, os.path.join(out_dir, f"diverged{rank}.pt"))

        # the end of a task: every rank keeps and releases the same slots and stays in step afterwards
        opt.consolidate()
        marks = {n: (s.kept.clone(), s.released.clone()) for n, s in opt.layer_scores.items()}
        for _ in range(2 * UPDATE_EVERY):
            ids = torch.randint(0, 128, (2, 16), generator=data).to(device)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        torch.save(to_cpu({**_snapshot(opt), "marks": marks}), os.path.join(out_dir, f"consolidated{rank}.pt"))

        # DDP's defaults (broadcast_buffers=True re-sends the buffers, stats probes included, every forward)
        model = DistributedDataParallel(_tiny_llama().to(device), device_ids=device_ids)
        opt = TopologyOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model.module, config)
        for _ in range(2 * UPDATE_EVERY):
            ids = torch.randint(0, 128, (2, 16), generator=data).to(device)  # drawn on the CPU: the same data on any device
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        torch.save(to_cpu(_snapshot(opt)), os.path.join(out_dir, f"defaults{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One 2-process run shared by the tests below (spawning costs seconds)."""
    require_dist_devices(WORLD)
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return out


def test_ddp_ranks_with_different_data_end_with_identical_topology_and_values(ddp_run):
    r0, r1 = (torch.load(ddp_run / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    for rank, r in enumerate((r0, r1)):
        print_rank_summary("DDP", rank, r["checksums"], r["decisions"], r["swaps"], r["values"])
    assert r0["decisions"] == r1["decisions"] >= 3  # decisions at steps 3, 6, 9, 12
    assert r0["swaps"] > 0 and r0["swaps"] == r1["swaps"]
    assert r0["checksums"] == r1["checksums"]
    for name in r0["col_indices"]:
        assert torch.equal(r0["col_indices"][name], r1["col_indices"][name]), name
        assert torch.equal(r0["values"][name], r1["values"][name]), name
    # the statistics were local until the last decision averaged them; afterwards they differ again
    assert any(not torch.equal(r0["probe_ema"][n], r1["probe_ema"][n]) for n in r0["probe_ema"])


def test_ddp_ranks_consolidate_the_same_slots_and_keep_them_through_the_next_decisions(ddp_run):
    before = torch.load(ddp_run / "rank0.pt", weights_only=True)["col_indices"]
    r0, r1 = (torch.load(ddp_run / f"consolidated{r}.pt", weights_only=True) for r in range(WORLD))
    assert r0["decisions"] == r1["decisions"] >= 5 and r0["checksums"] == r1["checksums"]
    for name, (kept, released) in r0["marks"].items():
        assert torch.equal(kept, r1["marks"][name][0]) and torch.equal(released, r1["marks"][name][1]), name
        assert bool(kept.any()) and torch.equal(r0["col_indices"][name][kept], before[name][kept]), name
        assert torch.equal(r0["values"][name], r1["values"][name]), name


def test_ddp_with_default_buffer_broadcast_and_the_inner_module_passed_agrees_too(ddp_run):
    r0, r1 = (torch.load(ddp_run / f"defaults{r}.pt", weights_only=True) for r in range(WORLD))
    for rank, r in enumerate((r0, r1)):
        print_rank_summary("DDP, default buffer broadcast", rank, r["checksums"], r["decisions"], r["swaps"], r["values"])
    assert r0["decisions"] == r1["decisions"] == 2  # decisions at steps 3 and 6
    assert r0["swaps"] > 0 and r0["swaps"] == r1["swaps"]
    assert r0["checksums"] == r1["checksums"]
    for name in r0["col_indices"]:
        assert torch.equal(r0["col_indices"][name], r1["col_indices"][name]), name
        assert torch.equal(r0["values"][name], r1["values"][name]), name


def test_topology_checksum_raises_on_every_rank_when_one_rank_diverges(ddp_run):
    for rank in range(WORLD):
        message = torch.load(ddp_run / f"diverged{rank}.pt", weights_only=True)
        assert "diverged across ranks" in message and "model.layers.0.mlp.gate_proj" in message
