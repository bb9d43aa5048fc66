"""The lora arm: adapters on every linear layer, the output head included, so that LoRA can learn bytes task A
never predicted (the head is where their logits come from); a learning rate of 0 changes nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("peft")

from forgetting import baselines as B  # noqa: E402
from forgetting.model import ModelConfig, build_model  # noqa: E402

CFG = ModelConfig(layers=2, hidden=32, mlp=64, heads=2, seq_len=16)


def _loss(model, x):
    return F.cross_entropy(model(input_ids=x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten())


@pytest.fixture(scope="module")
def task_a():
    """A tiny model trained on digits only (task A's bytes), its state and a batch source."""
    gen = torch.Generator().manual_seed(0)
    model = build_model(CFG, None, 16, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(100):
        _loss(model, torch.randint(48, 58, (16, 17), generator=gen)).backward()
        opt.step()
        opt.zero_grad()
    return {k: v.clone() for k, v in model.state_dict().items()}


def _from(state, rank):
    model = build_model(CFG, None, 16, seed=0)
    model.load_state_dict(state)
    return B.add_lora(model, rank)


def test_adapters_on_every_linear_and_the_head():
    model = build_model(CFG, None, 16, seed=0)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    per_rank = sum(m.in_features + m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert B.lora_rank(model, 3 * per_rank) == 3
    peft_model = B.add_lora(model, 3)
    modules = dict(peft_model.base_model.model.named_modules())
    assert all(hasattr(modules[n], "lora_A") for n in linears) and "lm_head" in linears
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == 3 * per_rank  # the adapters only: the tied embedding and the norms stay frozen


def test_learns_bytes_task_a_never_predicted(task_a):
    """Letters after a digits-only task A: adapters on the blocks alone stall (5.4 nats, the head's rows for
    letters were only pushed down in A); with the head's adapter the loss reaches ~ln 26 = 3.26."""
    gen = torch.Generator().manual_seed(1)
    model = _from(task_a, 4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for _ in range(50):
        _loss(model, torch.randint(97, 123, (16, 17), generator=gen)).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        assert _loss(model, torch.randint(97, 123, (64, 17), generator=gen)).item() < 3.8


def test_learning_rate_zero_changes_nothing(task_a):
    gen = torch.Generator().manual_seed(2)
    digits = torch.randint(48, 58, (8, 17), generator=gen)
    base = build_model(CFG, None, 16, seed=0)
    base.load_state_dict(task_a)
    with torch.no_grad():
        before = base(input_ids=digits).logits
    model = _from(task_a, 4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0, weight_decay=0.0)
    for _ in range(3):
        _loss(model, torch.randint(97, 123, (16, 17), generator=gen)).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        assert torch.equal(model(input_ids=digits).logits, before)
