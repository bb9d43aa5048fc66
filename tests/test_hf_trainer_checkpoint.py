"""A Trainer checkpoint of a sparse model is a sparse HF checkpoint: from_pretrained loads it sparse,
and resuming from it ends where the uninterrupted run ends, bit for bit."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("accelerate")
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments  # noqa: E402

from sparsify import TopologyConfig, TopologyOptimizer, sparse_layers, sparsify  # noqa: E402
from sparsify.integrations.hf_checkpoint import record_sparsity  # noqa: E402
from tests.conftest import tiny_llama  # noqa: E402


def train(out_dir, resume_from=None):
    model = sparsify(tiny_llama(layers=2).train(), components="mlp", block_size=16)
    record_sparsity(model)
    opt = TopologyOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model,
                            TopologyConfig(score_every=1, update_every=2, prune_fraction=0.5, swap_threshold=1.0, epsilon=0.3))
    ids = torch.randint(0, 128, (16, 16), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(output_dir=str(out_dir), max_steps=4, per_device_train_batch_size=4, save_strategy="steps",
                             save_steps=2, report_to="none", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in ids], optimizers=(opt, None))
    trainer.train(resume_from_checkpoint=resume_from)
    return model


def test_a_trainer_checkpoint_loads_sparse_and_resumes_bit_identically(tmp_path):
    whole = train(tmp_path / "whole")
    resumed = train(tmp_path / "resumed", resume_from=str(tmp_path / "whole" / "checkpoint-2"))
    for (name, a), (_, b) in zip(sparse_layers(whole), sparse_layers(resumed)):
        assert torch.equal(a.col_indices, b.col_indices) and torch.equal(a.values, b.values), name
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "checkpoint-4")
    assert [n for n, _ in sparse_layers(loaded)] == [n for n, _ in sparse_layers(whole)]
    assert all(torch.equal(a.col_indices, b.col_indices) for (_, a), (_, b) in zip(sparse_layers(loaded), sparse_layers(whole)))
