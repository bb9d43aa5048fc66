"""Two processes: FSDP2 (``fully_shard``) on the decoder layers of a sparsified Llama.

Block-rows are split unevenly on purpose (R = 7 and R = 3 over 2 ranks), every rank sees different
data, and the run goes through 4 decisions. Proven here: one topology and one set of (gathered)
block values on both ranks, swaps in the rows of both ranks, the same result as DDP, and a
torch.distributed.checkpoint save / load that resumes bit-identically.

By default the two ranks are CPU processes over gloo. On a machine with 2 GPUs, run them over NCCL,
rank i on cuda:i (the same assertions; ``-s`` shows every rank's number of topology decisions and swaps
and its topology checksums)::

    SPARSIFY_TEST_DIST_DEVICE=cuda python -m pytest -q -s tests/test_distributed_fsdp.py
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
SAVE_AT = 7  # checkpoint after the decision at step 6 and one more step
UPDATE_EVERY = 3



def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsify import sparsify

    torch.manual_seed(0)
    config = LlamaConfig(  # gate/up: R = 7, C = 3; down: R = 3, C = 7 (uneven shards over 2 ranks)
        hidden_size=48, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=128, max_position_embeddings=64, use_cache=False,
    )
    return sparsify(LlamaForCausalLM(config), components="mlp", density=0.5, block_size=16)


def _config():
    from sparsify import TopologyConfig

    return TopologyConfig(score_every=1, update_every=UPDATE_EVERY, epsilon=0.3, prune_fraction=0.5, swap_threshold=1.0)


def _sharded(mode: str, device: torch.device):
    """A fresh model on ``device`` and its TopologyOptimizer, FSDP2-sharded or DDP-wrapped."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from sparsify import TopologyOptimizer

    model = _tiny_llama().to(device)  # built on the CPU (same init on every device), then moved
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        # the mesh on this test's device: fully_shard's default mesh is on the accelerator whenever the
        # machine has one, which would move a CPU (gloo) run onto a GPU
        mesh = init_device_mesh(device.type, (WORLD,))
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        device_ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(model, broadcast_buffers=False, device_ids=device_ids)
    opt = TopologyOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model, _config())
    return model, opt


def _train(model, opt, batches) -> None:
    for ids in batches:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def _snapshot(opt) -> dict:
    """Topology, gathered values, records and statistics of this rank, on the CPU."""
    from sparsify.topology.distributed import topology_checksum
    from sparsify.topology.fsdp import is_sharded

    full = lambda v: v.full_tensor() if is_sharded(v) else v  # noqa: E731
    return to_cpu({
        "col_indices": {n: m.col_indices.clone() for n, m in opt.layers.items()},
        "values": {n: full(m.values) for n, m in opt.layers.items()},
        "checksums": {n: int(topology_checksum(m.col_indices)) for n, m in opt.layers.items()},
        "history": [{k: v for k, v in d.to_dict().items() if k != "seconds"} for d in opt.history],  # not timings
        "block_ema": {n: s.block_ema.clone() for n, s in opt.layer_scores.items()},
        "probe_ema": {n: s.probe_ema.clone() for n, s in opt.layer_scores.items()},
        "sharded": {n: is_sharded(m.values) for n, m in opt.layers.items()},
    })


def _worker(rank: int, port: int, out_dir: str) -> None:
    device = init_dist_worker(rank, WORLD, port)  # gloo on the CPU, or NCCL with this rank on cuda:rank
    try:
        import torch.distributed.checkpoint as dcp

        from sparsify.topology.fsdp import checkpoint_state, load_checkpoint_state, row_range

        data = torch.Generator().manual_seed(1000 + rank)  # different data on every rank
        # drawn on the CPU, then moved: the same data on any device
        batches = [torch.randint(0, 128, (2, 16), generator=data).to(device) for _ in range(STEPS)]
        out = {}

        # FSDP2, with a checkpoint on the way
        model, opt = _sharded("fsdp", device)
        out["group_is_world"] = opt.process_group is not None and dist.get_world_size(opt.process_group) == WORLD
        out["row_ranges"] = {n: row_range(m.values) for n, m in opt.layers.items()}
        _train(model, opt, batches[:SAVE_AT])
        checkpoint = os.path.join(out_dir, "checkpoint")
        dcp.save(checkpoint_state(model, opt), checkpoint_id=checkpoint)
        _train(model, opt, batches[SAVE_AT:])
        model(input_ids=batches[0], labels=batches[0]).loss.backward()  # the probe's gradient is a plain local tensor
        probe = next(iter(opt.layers.values())).stats_probe.grad
        out["probe_grad"] = (type(probe).__name__, to_cpu(probe))
        opt.zero_grad()
        out["fsdp"] = _snapshot(opt)

        # resumed from the checkpoint in a fresh model and optimizer
        model, opt = _sharded("fsdp", device)
        load_checkpoint_state(model, opt, checkpoint)
        out["resumed_step"] = opt.global_step
        _train(model, opt, batches[SAVE_AT:])
        out["resumed"] = _snapshot(opt)

        # protected slots are frozen in every rank's own rows
        model, opt = _sharded("fsdp", device)
        name = "model.layers.0.mlp.gate_proj"
        mask = torch.zeros(opt.layer_scores[name].protected.shape, dtype=torch.bool)  # on the CPU: protect() copies it
        mask[::2] = True  # every other block-row, so both ranks hold protected rows
        opt.protect(name, mask)
        before = to_cpu(opt.layers[name].values.full_tensor())
        _train(model, opt, batches[:UPDATE_EVERY])
        after = to_cpu(opt.layers[name].values.full_tensor())
        out["protected"] = (mask, before, after, to_cpu(opt.layers[name].col_indices), _snapshot(opt)["col_indices"])

        # the magnitude scorer reads the full block norms (all-gathered) and agrees too
        model, opt = _sharded("fsdp", device)
        opt.config.scorer = "magnitude"
        _train(model, opt, batches[: 2 * UPDATE_EVERY])
        out["magnitude"] = _snapshot(opt)

        # the same training under DDP
        model, opt = _sharded("ddp", device)
        _train(model, opt, batches)
        out["ddp"] = _snapshot(opt)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """One 2-process run shared by the tests below (spawning costs seconds)."""
    require_dist_devices(WORLD)
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch.distributed.fsdp.fully_shard")
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no torch.distributed.fsdp.fully_shard (FSDP2)")
    out = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _assert_same(a: dict, b: dict, what: str) -> None:
    assert a["col_indices"].keys() == b["col_indices"].keys()
    for name in a["col_indices"]:
        assert torch.equal(a["col_indices"][name], b["col_indices"][name]), f"{what}: topology of {name}"
        assert torch.equal(a["values"][name], b["values"][name]), f"{what}: values of {name}"
    assert a["checksums"] == b["checksums"], what


def test_fsdp_shards_values_by_block_rows_unevenly_over_the_mesh_group(fsdp_run):
    r0, r1 = fsdp_run
    assert r0["group_is_world"] and r1["group_is_world"]
    assert all(r0["fsdp"]["sharded"].values())
    for name, (first, stop) in r0["row_ranges"].items():
        first1, stop1 = r1["row_ranges"][name]
        assert first == 0 and stop == first1 and stop1 == r0["fsdp"]["col_indices"][name].shape[0], name
    assert {stop1 - first1 for first1, stop1 in r1["row_ranges"].values()} == {1, 3}  # R = 3 -> 2 + 1, R = 7 -> 4 + 3


def test_fsdp_ranks_with_different_data_end_with_identical_topology_and_values(fsdp_run):
    r0, r1 = fsdp_run
    for rank, r in enumerate(fsdp_run):
        history = r["fsdp"]["history"]
        print_rank_summary("FSDP2", rank, r["fsdp"]["checksums"], len({d["step"] for d in history}),
                           sum(d["num_swaps"] for d in history), r["fsdp"]["values"])
    _assert_same(r0["fsdp"], r1["fsdp"], "rank 0 vs rank 1")
    decisions = {d["step"] for d in r0["fsdp"]["history"]}
    assert decisions == {3, 6, 9, 12} and len(decisions) >= 3
    swaps = [(d["layer"], row) for d in r0["fsdp"]["history"] for row, _, _ in d["grown"]]
    assert len(swaps) > 0 and r0["fsdp"]["history"] == r1["fsdp"]["history"]
    # swaps landed in the rows of both ranks, so both ranks wrote their own shards
    owner = lambda layer, row: int(row >= r1["row_ranges"][layer][0])  # noqa: E731
    assert {owner(layer, row) for layer, row in swaps} == {0, 1}
    # the records match, scores included (pruned_scores, mean_block_score): both ranks decided on the
    # full [R, K] block scores, though each rank's gradient shard only covers its own rows
    assert all(d["pruned_scores"] for d in r0["fsdp"]["history"] if d["num_swaps"])


def test_fsdp_probe_statistics_stay_local_to_a_rank(fsdp_run):
    r0, r1 = fsdp_run
    assert r0["probe_grad"][0] == "Tensor"  # a plain tensor: FSDP2 does not touch buffers' gradients
    assert not torch.equal(r0["probe_grad"][1], r1["probe_grad"][1])
    assert any(not torch.equal(r0["fsdp"]["probe_ema"][n], r1["fsdp"]["probe_ema"][n]) for n in r0["fsdp"]["probe_ema"])


def test_fsdp_matches_ddp_on_the_same_data(fsdp_run):
    for rank, r in enumerate(fsdp_run):
        swaps = {mode: [(d["step"], d["layer"], d["pruned"], d["grown"]) for d in r[mode]["history"]]
                 for mode in ("fsdp", "ddp")}
        assert swaps["fsdp"] == swaps["ddp"], rank  # the same decisions (scores may differ in the last bits)
        for name in r["fsdp"]["col_indices"]:
            assert torch.equal(r["fsdp"]["col_indices"][name], r["ddp"]["col_indices"][name]), (rank, name)
            # not bitwise, on the CPU or on GPUs: FSDP2 reduce-scatters the gradients (per layer group) and DDP
            # all-reduces them (per bucket), so the gradients may differ in the last bits
            torch.testing.assert_close(r["fsdp"]["values"][name], r["ddp"]["values"][name], rtol=1e-5, atol=1e-6)


def test_fsdp_checkpoint_with_dcp_resumes_bit_identically(fsdp_run):
    for rank, r in enumerate(fsdp_run):
        assert r["resumed_step"] == SAVE_AT
        _assert_same(r["fsdp"], r["resumed"], f"rank {rank}: uninterrupted vs resumed")
        assert r["resumed"]["history"] == r["fsdp"]["history"], rank  # the history before the save came back too
        for name in r["fsdp"]["block_ema"]:
            assert torch.equal(r["fsdp"]["block_ema"][name], r["resumed"]["block_ema"][name]), (rank, name)
            assert torch.equal(r["fsdp"]["probe_ema"][name], r["resumed"]["probe_ema"][name]), (rank, name)


def test_fsdp_protected_slots_stay_frozen_in_both_ranks_rows(fsdp_run):
    for rank, r in enumerate(fsdp_run):
        mask, before, after, cols, _ = r["protected"]
        assert torch.equal(after[mask], before[mask]), rank
        assert not torch.equal(after[~mask], before[~mask]), rank  # the others trained
    mask, _, _, cols, _ = fsdp_run[0]["protected"]
    assert torch.equal(cols, fsdp_run[1]["protected"][3])


def test_fsdp_with_the_magnitude_scorer_agrees_across_ranks(fsdp_run):
    r0, r1 = fsdp_run
    _assert_same(r0["magnitude"], r1["magnitude"], "magnitude scorer")
    assert r0["magnitude"]["history"] == r1["magnitude"]["history"]
    assert sum(d["num_swaps"] for d in r0["magnitude"]["history"]) > 0
