"""Metrics: exact-match accuracy of greedy answers (task A) and held-out loss in nats per byte (task B)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from forgetting_lib.data import encode


def exact_match(model, problems: list[tuple[str, str]], device, batch: int = 500) -> float:
    """Exact match of greedy answers (see ``answer_scores``)."""
    return answer_scores(model, problems, device, batch)[0]


@torch.no_grad()
def answer_scores(model, problems: list[tuple[str, str]], device, batch: int = 500) -> tuple[float, float]:
    """Exact match of greedy answers to ``"\\nQ: {q} A: "`` (the answer, then the newline that ends it).

    Greedy decoding yields the true answer exactly when, along the true answer, every next byte is the
    argmax: so one teacher-forced forward pass decides it (right padding cannot affect earlier positions).
    Returns (exact match, answer-byte accuracy): the second, the fraction of answer bytes (newline
    included) that are the argmax given the true prefix, is a finer measure of the same knowledge.
    """
    was_training = model.training
    model.eval()
    correct, bytes_right, bytes_total = 0, 0, 0
    for i in range(0, len(problems), batch):
        chunk = [(encode(f"\nQ: {q} A: "), encode(f"{a}\n")) for q, a in problems[i : i + batch]]
        width = max(len(p) + len(a) for p, a in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        target = torch.zeros(len(chunk), width, dtype=torch.bool)  # positions holding answer bytes
        for row, (p, a) in enumerate(chunk):
            ids[row, : len(p) + len(a)] = torch.tensor(p + a)
            target[row, len(p) : len(p) + len(a)] = True
        ids, target = ids.to(device), target.to(device)
        predicted = model(input_ids=ids, use_cache=False).logits.argmax(-1)  # [n, T]: guesses for position t + 1
        hit = (predicted[:, :-1] == ids[:, 1:]) | ~target[:, 1:]
        correct += int(hit.all(dim=1).sum())
        bytes_right += int((hit & target[:, 1:]).sum())
        bytes_total += int(target[:, 1:].sum())
    model.train(was_training)
    return correct / max(1, len(problems)), bytes_right / max(1, bytes_total)


@torch.no_grad()
def heldout_loss(model, windows: torch.Tensor, device, batch: int = 32) -> float:
    """Mean next-byte cross-entropy (nats) over fixed windows ``[N, T + 1]``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        chunk = windows[i : i + batch].to(device)
        logits = model(input_ids=chunk[:, :-1], use_cache=False).logits.float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum").item()
        count += chunk[:, 1:].numel()
    model.train(was_training)
    return total / count
