"""Two CPU processes over gloo: DDP with different data per rank ends with one topology everywhere."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import free_port

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


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.nn.parallel import DistributedDataParallel

        from sparsify import TopologyConfig, TopologyOptimizer
        from sparsify.topology.distributed import check_same_topology

        # broadcast_buffers=False: nothing but the topology optimizer keeps col_indices in step across ranks
        model = DistributedDataParallel(_tiny_llama(), broadcast_buffers=False)
        config = TopologyConfig(score_every=1, update_every=UPDATE_EVERY, epsilon=0.3, prune_fraction=0.5, swap_threshold=1.0)
        opt = TopologyOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model, config)
        assert opt.process_group is model.process_group
        data = torch.Generator().manual_seed(1000 + rank)  # different data on every rank
        for _ in range(STEPS):
            ids = torch.randint(0, 128, (2, 16), generator=data)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        layers = opt.layers
        local_stats = {n: s.probe_ema.clone() for n, s in opt.layer_scores.items()}
        torch.save({
            "col_indices": {n: m.col_indices.clone() for n, m in layers.items()},
            "values": {n: m.values.detach().clone() for n, m in layers.items()},
            "swaps": sum(d.num_swaps for d in opt.history),
            "probe_ema": local_stats,
        }, os.path.join(out_dir, f"rank{rank}.pt"))

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

        # DDP's defaults (broadcast_buffers=True re-sends the buffers, stats probes included, every forward)
        model = DistributedDataParallel(_tiny_llama())
        opt = TopologyOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model.module, config)
        for _ in range(2 * UPDATE_EVERY):
            ids = torch.randint(0, 128, (2, 16), generator=data)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        torch.save({
            "col_indices": {n: m.col_indices.clone() for n, m in opt.layers.items()},
            "values": {n: m.values.detach().clone() for n, m in opt.layers.items()},
            "swaps": sum(d.num_swaps for d in opt.history),
        }, os.path.join(out_dir, f"defaults{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One 2-process run shared by the tests below (spawning costs seconds)."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return out


def test_ddp_ranks_with_different_data_end_with_identical_topology_and_values(ddp_run):
    r0, r1 = (torch.load(ddp_run / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    assert r0["swaps"] > 0 and r0["swaps"] == r1["swaps"]
    for name in r0["col_indices"]:
        assert torch.equal(r0["col_indices"][name], r1["col_indices"][name]), name
        assert torch.equal(r0["values"][name], r1["values"][name]), name
    # the statistics were local until the last decision averaged them; afterwards they differ again
    assert any(not torch.equal(r0["probe_ema"][n], r1["probe_ema"][n]) for n in r0["probe_ema"])


def test_ddp_with_default_buffer_broadcast_and_the_inner_module_passed_agrees_too(ddp_run):
    r0, r1 = (torch.load(ddp_run / f"defaults{r}.pt", weights_only=True) for r in range(WORLD))
    assert r0["swaps"] > 0 and r0["swaps"] == r1["swaps"]
    for name in r0["col_indices"]:
        assert torch.equal(r0["col_indices"][name], r1["col_indices"][name]), name
        assert torch.equal(r0["values"][name], r1["values"][name]), name


def test_topology_checksum_raises_on_every_rank_when_one_rank_diverges(ddp_run):
    for rank in range(WORLD):
        message = torch.load(ddp_run / f"diverged{rank}.pt", weights_only=True)
        assert "diverged across ranks" in message and "model.layers.0.mlp.gate_proj" in message
