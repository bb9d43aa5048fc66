"""Metrics: exact-match accuracy of greedy answers (task A) and held-out loss in nats per byte (task B).

Both are a few batched forward passes with the counts kept on the device: one host synchronization
per call (on a GPU shared by many runs, a sync per batch or per token stalls the run's queue).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from forgetting.data import encode

_ENCODED: dict = {}  # (id(problems), device, batch) -> (problems, [(ids, target)]): encoded once per process


# 256 problems of at most 23 bytes: at most 8192 tokens a forward pass, the token bucket of a training step
# (64 x 128), so evaluation reuses its kernel configs instead of autotuning new ones in every process.
EVAL_BATCH = 256


def exact_match(model, problems: list[tuple[str, str]], device, batch: int = EVAL_BATCH) -> float:
    """Exact match of greedy answers (see ``answer_scores``)."""
    return answer_scores(model, problems, device, batch)[0]


def _encoded(problems: list[tuple[str, str]], device, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The problems as right-padded byte batches on ``device``: ids [n, T] int64 and target [n, T] bool
    (the positions holding answer bytes), built once per problem list."""
    key = (id(problems), str(device), batch)
    if key not in _ENCODED or _ENCODED[key][0] is not problems:
        chunks = []
        for i in range(0, len(problems), batch):
            chunk = [(encode(f"\nQ: {q} A: "), encode(f"{a}\n")) for q, a in problems[i : i + batch]]
            width = max(len(p) + len(a) for p, a in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            target = torch.zeros(len(chunk), width, dtype=torch.bool)
            for row, (p, a) in enumerate(chunk):
                ids[row, : len(p) + len(a)] = torch.tensor(p + a)
                target[row, len(p) : len(p) + len(a)] = True
            chunks.append((ids.to(device), target.to(device)))
        _ENCODED[key] = (problems, chunks)  # holding the list keeps its id from being reused
    return _ENCODED[key][1]


@torch.no_grad()
def answer_scores(model, problems: list[tuple[str, str]], device, batch: int = EVAL_BATCH) -> tuple[float, float]:
    """Exact match of greedy answers to ``"\\nQ: {q} A: "`` (the answer, then the newline that ends it).

    Greedy decoding yields the true answer exactly when, along the true answer, every next byte is the
    argmax: so one teacher-forced forward pass decides it (right padding cannot affect earlier positions),
    with no decoding loop. Returns (exact match, answer-byte accuracy): the second, the fraction of answer
    bytes (newline included) that are the argmax given the true prefix, is a finer measure of the same
    knowledge.
    """
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.long, device=device)  # correct answers, answer bytes right, answer bytes
    for ids, target in _encoded(problems, device, batch):
        predicted = model(input_ids=ids, use_cache=False).logits.argmax(-1)  # [n, T]: guesses for position t + 1
        hit = (predicted[:, :-1] == ids[:, 1:]) | ~target[:, 1:]
        counts += torch.stack([hit.all(dim=1).sum(), (hit & target[:, 1:]).sum(), target[:, 1:].sum()])
    model.train(was_training)
    correct, bytes_right, bytes_total = counts.tolist()
    return correct / max(1, len(problems)), bytes_right / max(1, bytes_total)


@torch.no_grad()
def heldout_loss(model, windows: torch.Tensor, device, batch: int = 64) -> float:
    """Mean next-byte cross-entropy (nats) over fixed windows ``[N, T + 1]``."""
    was_training = model.training
    model.eval()
    windows = windows.to(device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for i in range(0, len(windows), batch):
        chunk = windows[i : i + batch]
        logits = model(input_ids=chunk[:, :-1], use_cache=False).logits.float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum")
    model.train(was_training)
    return total.item() / windows[:, 1:].numel()
