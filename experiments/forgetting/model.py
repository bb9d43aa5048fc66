"""The model: an HF Llama-style causal LM built from a config (random init), byte vocabulary,
with the MLPs of the chosen layers rewritten into Block-ELL layers by ``sparsify``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sparsify import sparsify

from forgetting.data import VOCAB


@dataclass
class ModelConfig:
    layers: int = 6
    hidden: int = 256
    mlp: int = 1024
    heads: int = 4
    seq_len: int = 128
    sparse_layers: str = "1..4"  # the middle layers


def build_model(cfg: ModelConfig, density: float | None, block_size: int, seed: int) -> LlamaForCausalLM:
    """Dense when ``density`` is None, else the MLPs of ``cfg.sparse_layers`` kept at ``density``."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=cfg.hidden, intermediate_size=cfg.mlp, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads, max_position_embeddings=cfg.seq_len + 32,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    if density is not None:
        sparsify(model, layers=cfg.sparse_layers, components="mlp", density=density, block_size=block_size,
                 init="random", seed=seed)
    return model
