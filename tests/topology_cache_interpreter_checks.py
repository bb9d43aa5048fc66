"""The topology cache around the real metadata builders (column view, slot table, column check) under
Triton's interpreter, run only by test_topology_cache.py in a child pytest process (TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

import pytest
import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_topology_cache.py"

from sparsify.kernels import column_check, column_view, tiles, topology_cache  # noqa: E402

BUILDERS = {"column view": column_view.column_view, "slot table": tiles.slot_table}


def topology(rows, cols, k, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(cols, generator=gen)[:k] for _ in range(rows)]).to(torch.int32)


def same(a, b) -> bool:
    a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_cached_metadata_equals_a_fresh_build_after_a_decision_is_applied(kind):
    build = topology_cache.per_topology(kind, BUILDERS[kind])
    col = topology(5, 9, 4, seed=1)
    first = build(col, 9)
    assert build(col, 9) is first  # reused while the topology stands
    torch._foreach_copy_([col], [topology(5, 9, 4, seed=2)])  # as topology/apply.py writes a decision
    after = build(col, 9)
    assert after is not first and same(after, BUILDERS[kind](col.clone(), 9))


def test_the_column_check_runs_again_for_a_new_topology_state():
    check = topology_cache.per_topology("columns checked", column_check.check_columns)
    col = topology(3, 4, 2, seed=3)
    check(col, 4)
    col[1, 0] = 4  # out of [0, 4): an in-place write, so the check must run again and fail
    with pytest.raises(RuntimeError, match=r"outside \[0, 4\)"):
        check(col, 4)
    with pytest.raises(RuntimeError, match=r"outside \[0, 4\)"):  # a failed check is not remembered
        check(col, 4)
