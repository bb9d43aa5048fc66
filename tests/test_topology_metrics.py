"""Decision records, reports, snapshots and diffs, logging, callbacks and plots."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sparsify import TopologyConfig, TopologyOptimizer, sparsify, topology_report
from sparsify.topology import column_entropy, diff, plot_block_mask, plot_swap_rate, snapshot, swap_rates

LIVELY = TopologyConfig(score_every=2, update_every=3, prune_fraction=0.5, swap_threshold=1.0, epsilon=0.2)


def trained(steps: int = 6, **kw):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=128, max_position_embeddings=64)
    model = sparsify(LlamaForCausalLM(config), components="mlp", density=0.5, block_size=16)
    opt = TopologyOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model, LIVELY, **kw)
    data = torch.Generator().manual_seed(0)
    snaps = [snapshot(model)]
    for _ in range(steps):
        ids = torch.randint(0, 128, (2, 16), generator=data)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        snaps.append(snapshot(model))
    return model, opt, snaps


def test_column_entropy_is_one_for_even_use_and_zero_for_a_single_column():
    assert column_entropy(torch.tensor([[0, 1], [2, 3]]), 4) == pytest.approx(1.0)
    assert column_entropy(torch.tensor([[2], [2], [2]]), 4) == pytest.approx(0.0)
    assert 0.0 < column_entropy(torch.tensor([[0, 1], [0, 2]]), 4) < 1.0


def test_decision_records_describe_exactly_the_change_of_the_topology():
    model, opt, snaps = trained(steps=3)
    records = [d for d in opt.history if d.step == 3]
    assert len(records) == len(opt.layers) and any(d.num_swaps for d in records)
    changes = diff(snaps[2], snaps[3])
    for record in records:
        layer = opt.layers[record.layer]
        assert record.num_blocks == layer.num_rows * layer.blocks_per_row
        assert record.swap_rate == pytest.approx(record.num_swaps / record.num_blocks)
        assert len(record.pruned) == len(record.grown) == record.num_swaps == len(record.grown_scores)
        assert [(r, s) for r, s, _ in record.pruned] == [(r, s) for r, s, _ in record.grown]
        assert sorted(changes[record.layer].blocks("removed")) == sorted((r, c) for r, _, c in record.pruned)
        assert sorted(changes[record.layer].blocks("added")) == sorted((r, c) for r, _, c in record.grown)
        counts = changes[record.layer].counts
        assert counts["kept"] + counts["removed"] == record.num_blocks and record.seconds >= 0


def test_topology_report_has_one_row_per_layer_and_prints_a_table():
    model, opt, _ = trained()
    report = topology_report(model, opt)
    assert [row["layer"] for row in report] == list(opt.layers)
    for row in report:
        assert row["density"] == 0.5 and 0.0 <= row["column_entropy"] <= 1.0
        assert 0 <= row["mean_age"] <= 6
        assert row["swaps_total"] == sum(d.num_swaps for d in opt.history if d.layer == row["layer"])
    table = str(report)
    assert "column_entropy" in table and "model.layers.1.mlp.down_proj" in table
    assert topology_report(model)[0]["mean_age"] is None  # ages live in the optimizer


def test_every_decision_is_logged_and_sent_to_callbacks(caplog):
    seen = []
    with caplog.at_level(logging.INFO, logger="sparsify.topology"):
        _, opt, _ = trained(steps=6, on_decision=lambda step, metrics, records: seen.append((step, metrics, records)))
    messages = [r.getMessage() for r in caplog.records if r.name == "sparsify.topology"]
    assert len(messages) == 2 and all("swaps" in m and "column entropy" in m and "mean age" in m for m in messages)
    assert [step for step, _, _ in seen] == [3, 6]
    step, metrics, records = seen[0]
    assert metrics["topology/swaps"] == sum(d.num_swaps for d in records)
    assert 0 <= metrics["topology/swap_rate"] <= 1 and metrics["topology/mean_age"] >= 0
    assert swap_rates(opt.history)[0][1] == pytest.approx(metrics["topology/swap_rate"])


def test_add_callback_registers_another_receiver():
    model, opt, _ = trained(steps=2)
    steps = []
    opt.add_callback(lambda step, metrics, records: steps.append((step, len(records))))
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert steps == [(3, len(opt.layers))]


def test_history_keeps_only_the_newest_records_when_bounded():
    model, opt, _ = trained(steps=0)
    opt.config.history_size = 4
    data = torch.Generator().manual_seed(0)
    for _ in range(6):
        ids = torch.randint(0, 128, (2, 16), generator=data)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert len(opt.history) == 4 and all(d.step == 6 for d in opt.history)


def test_plots_are_written_as_png_files(tmp_path):
    pytest.importorskip("matplotlib")
    model, opt, _ = trained()
    layer = next(iter(opt.layers.values()))
    plot_block_mask(layer, tmp_path / "mask.png")
    plot_swap_rate(opt.history, tmp_path / "swaps.png")
    for name in ("mask.png", "swaps.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
