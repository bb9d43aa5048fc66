"""Timing shared by the benchmarks: ``do_bench`` medians, and candidates timed in alternating rounds.

Why rounds: on the H200, one code path timed twice a few seconds apart in one process read up to 17% apart
(benchmarks/NOTES.md, fifth session: the grouped kernel as "today" and as its own design, the dense-weight
route as "auto" and as its forced variant). A candidate timed once carries that drift into every ratio it
is part of. Timed in turn (A, B, C, A, B, C, ...) for several rounds, each candidate's median over its
rounds sees the same drift as the others, and the spread of its rounds says how far one timing can be
trusted.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def median_ms(fn: Callable[[], object], warmup_ms: int = 10, rep_ms: int = 40) -> float:
    """``triton.testing.do_bench``'s median (it flushes L2 between repetitions)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def rounds_ms(candidates: dict[str, Callable[[], object]], rounds: int = 5, rep_ms: int = 20,
              timer: Callable[..., float] | None = None) -> dict[str, dict]:
    """Each candidate timed once a round, in the same order every round, ``rounds`` rounds. Returns per
    name {"ms": the median of its rounds, "spread": (max - min) / median of its rounds, "rounds": [...]}.
    ``timer(fn, rep_ms=...)`` is ``median_ms`` unless given (tests)."""
    if rounds < 1:
        raise ValueError(f"rounds_ms: rounds must be at least 1, got {rounds}")
    timer = timer or (lambda fn, rep_ms: median_ms(fn, warmup_ms=max(1, rep_ms // 4), rep_ms=rep_ms))
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            times[name].append(timer(fn, rep_ms=rep_ms))
    out = {}
    for name, values in times.items():
        ordered = sorted(values)
        middle = len(ordered) // 2
        median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
        out[name] = {"ms": median, "spread": (ordered[-1] - ordered[0]) / median, "rounds": values}
    return out


def cuda_graph_of(fns: list[Callable[[], object]], calls: int):
    """One CUDA graph of ``calls`` back-to-back calls rotating through ``fns`` (one per weight copy, so that
    weights do not stay in L2 between calls), each warmed up first on a side stream (autotuning and
    compilation happen there, not under capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in range(calls):
            fns[call % len(fns)]()
    return graph
