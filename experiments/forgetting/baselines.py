"""The literature's baselines against forgetting: replay of task-A data in B's batches, and LoRA adapters."""

from __future__ import annotations

import torch
from torch import nn

from sparsify import sparse_layers

from forgetting.model import ModelConfig, build_model


def replay_rows(steps: int, batch: int, fraction: float, seed: int) -> torch.Tensor:
    """Which of B's training sequences are replayed from task A: bool ``[steps, batch]`` with exactly
    ``round(fraction * steps * batch)`` set, spread at random over the phase. Its own generator, so the
    B sequences of every arm are the same windows whatever the replay."""
    gen = torch.Generator().manual_seed(5000 + seed)
    mask = torch.zeros(steps * batch, dtype=torch.bool)
    mask[torch.randperm(steps * batch, generator=gen)[: round(fraction * steps * batch)]] = True
    return mask.view(steps, batch)


def sparse_trainable(cfg: ModelConfig, density: float, block_size: int = 16) -> int:
    """The block values a sparse arm trains in its sparse layers (what LoRA's adapters are matched to)."""
    model = build_model(cfg, density, block_size, seed=0)
    return sum(layer.values.numel() for _, layer in sparse_layers(model))


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def lora_rank(model: nn.Module, target: int) -> int:
    """The LoRA rank whose adapters on every linear layer, the output head included, have ``target``
    parameters (a rank-r adapter on an in x out linear has r * (in + out))."""
    per_rank = sum(m.in_features + m.out_features for m in _linears(model).values())
    return max(1, round(target / per_rank))


def add_lora(model: nn.Module, rank: int) -> nn.Module:
    """``model`` frozen with LoRA adapters (peft; alpha = 2 x rank, no dropout) on every linear layer,
    the output head included. peft's ``"all-linear"`` leaves the head out, and here the head is what task
    B needs: B's bytes (letters) are never task-A targets, so A only pushed their output rows down; with
    the head (tied to the embeddings) and the final norm frozen, adapters on the blocks alone cannot raise
    them (B's loss stalled at ~4.0 nats/byte on the GPU, ~4.5 on a CPU probe, whatever the learning rate).
    The adapter on the head adds to the logits only; the tied embedding stays frozen."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ImportError("the lora arm needs peft: pip install peft (it is in the test extra)") from error
    targets = sorted({name.rsplit(".", 1)[-1] for name in _linears(model)})  # q_proj, ..., down_proj, lm_head
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets, bias="none")
    return get_peft_model(model, config)
