"""The HF Trainer accepts a TopologyOptimizer and an LR scheduler built on it."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("accelerate")
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

from sparsify import TopologyConfig, TopologyOptimizer, sparsify  # noqa: E402


def test_trainer_steps_the_topology_optimizer_and_its_scheduler(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=128, max_position_embeddings=64)
    model = sparsify(LlamaForCausalLM(config), components="mlp", density=0.5, block_size=16)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = TopologyOptimizer(inner, model, TopologyConfig(score_every=1, update_every=2, prune_fraction=0.5,
                                                         swap_threshold=1.0, epsilon=0.3))
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    ids = torch.randint(0, 128, (16, 16), generator=torch.Generator().manual_seed(0))
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=1e-3, logging_steps=2, save_strategy="no", report_to="none", use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, optimizers=(opt, scheduler))
    trainer.train()
    assert opt.global_step == 4  # one step per accumulated batch
    assert [d.step for d in opt.history][:: len(opt.layers)] == [2, 4]
    assert sum(d.num_swaps for d in opt.history) > 0
    assert inner.param_groups[0]["lr"] == pytest.approx(1e-3 / 5)
