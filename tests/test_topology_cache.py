"""The per-topology metadata cache (sparsify/kernels/topology_cache.py): reused while col_indices is
unchanged, rebuilt after every way the library writes a topology, never kept past its tensor."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import pytest
import torch

from sparsify.kernels import topology_cache


@pytest.fixture(autouse=True)
def _fresh_cache():
    topology_cache.clear()
    yield
    topology_cache.clear()


def column_counts(col: torch.Tensor, num_cols: int) -> torch.Tensor:
    return torch.bincount(col.reshape(-1).long(), minlength=num_cols)


def lookup(col: torch.Tensor, num_cols: int = 8) -> torch.Tensor:
    return topology_cache.cached(col, "counts", num_cols, lambda: column_counts(col, num_cols))


def topology() -> torch.Tensor:
    return torch.tensor([[0, 3, 5], [1, 2, 7], [4, 5, 6]], dtype=torch.int32)


def test_metadata_is_built_once_while_the_topology_is_unchanged():
    col = topology()
    before = topology_cache.builds
    first, second = lookup(col), lookup(col)
    assert second is first
    assert topology_cache.builds == before + 1


def _copy(col, new):
    col.copy_(new)


def _copy_no_grad(col, new):
    with torch.no_grad():
        col.copy_(new)


def _foreach_copy(col, new):  # how the topology optimizer applies a decision (topology/apply.py)
    torch._foreach_copy_([col], [new])


def _setitem(col, new):
    col[1] = new[1]


def _load_state_dict(col, new):
    module = torch.nn.Module()
    module.register_buffer("col_indices", col)
    module.load_state_dict({"col_indices": new})
    assert module.col_indices is col


@pytest.mark.parametrize("write", [_copy, _copy_no_grad, _foreach_copy, _setitem, _load_state_dict])
def test_metadata_is_rebuilt_after_an_in_place_topology_write(write):
    col = topology()
    stale = lookup(col)
    new = torch.tensor([[0, 3, 5], [0, 1, 2], [4, 5, 6]], dtype=torch.int32)
    write(col, new)
    fresh = lookup(col)
    assert fresh is not stale
    assert torch.equal(fresh, column_counts(new, 8))


def test_metadata_is_rebuilt_when_the_tensor_gets_new_storage():
    col = topology()
    stale = lookup(col)
    col.data = torch.tensor([[1, 2, 3], [1, 2, 3], [1, 2, 3]], dtype=torch.int32)
    assert torch.equal(lookup(col), column_counts(col, 8))
    assert lookup(col) is not stale


def test_entries_for_different_kinds_and_widths_are_separate():
    col = topology()
    narrow = topology_cache.cached(col, "counts", 8, lambda: column_counts(col, 8))
    wide = topology_cache.cached(col, "counts", 10, lambda: column_counts(col, 10))
    other = topology_cache.cached(col, "other", 8, lambda: col.sum())
    assert narrow.shape == (8,) and wide.shape == (10,) and other.dim() == 0


def test_an_entry_goes_with_its_topology_tensor():
    col = topology()
    value = lookup(col)
    assert len(topology_cache._entries) == 1
    del col, value
    gc.collect()
    assert len(topology_cache._entries) == 0


def test_inference_tensors_and_subclasses_are_never_cached():
    with torch.inference_mode():
        col = topology()
    before = topology_cache.builds
    assert lookup(col) is not lookup(col)
    param_like = torch.nn.Parameter(topology().float(), requires_grad=False)
    topology_cache.cached(param_like, "sum", 0, lambda: param_like.sum())
    assert topology_cache.builds == before


def test_cache_around_the_triton_metadata_builders_under_the_interpreter():
    pytest.importorskip("triton")
    checks = os.path.join(os.path.dirname(__file__), "topology_cache_interpreter_checks.py")
    env = {name: value for name, value in os.environ.items() if not name.startswith("SPARSIFY_")}
    env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, "-m", "pytest", checks, "-p", "no:cacheprovider", "-q"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"interpreter checks failed:\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    assert "3 passed" in done.stdout.strip().splitlines()[-1]


def test_under_capture_metadata_is_rebuilt_but_an_earlier_column_check_is_reused(monkeypatch):
    col = topology()
    checks, builds = [], []
    check = topology_cache.per_topology("check", lambda c, n: checks.append(1), reuse_under_capture=True)
    build = topology_cache.per_topology("view", lambda c, n: builds.append(1) or len(builds))
    check(col, 8)
    build(col, 8)
    monkeypatch.setattr(topology_cache, "_capturing", lambda c: True)
    check(col, 8)  # checked before the capture: the graph needs no checking launches
    assert build(col, 8) == 2  # the graph must rebuild the metadata from what col_indices holds at replay
    assert build(col, 8) == 3  # and nothing built during capture is remembered
    col[0, 0] = 2  # a new state, first seen under capture: checked inside the graph
    check(col, 8)
    assert len(checks) == 2
    monkeypatch.setattr(topology_cache, "_capturing", lambda c: False)
    check(col, 8)  # the in-capture check was not remembered either
    assert len(checks) == 3


class _Trees:
    """A stand-in for torch._inductor.cudagraph_trees: one manager in the given state (or none / broken)."""

    def __init__(self, state=None, broken=False):
        self.state, self.broken = state, broken

    def get_manager(self, index, create_if_none_exists=True):
        assert create_if_none_exists is False
        if self.broken:
            raise AttributeError("internals changed")
        if self.state is None:
            return None
        return type("Manager", (), {"path_state": type("State", (), {"name": self.state})()})()


def _cuda_like():
    return type("Col", (), {"is_cuda": True, "device": torch.device("cuda", 0)})()


@pytest.mark.parametrize("trees, warming", [
    (None, False), (_Trees(None), False), (_Trees("WARMUP"), True), (_Trees("RECORDING"), False),
    (_Trees("EXECUTION"), False), (_Trees(broken=True), True),
])
def test_a_cudagraph_warm_up_is_recognised_and_unknown_internals_count_as_one(monkeypatch, trees, warming):
    name = "torch._inductor.cudagraph_trees"
    if trees is None:
        monkeypatch.delitem(sys.modules, name, raising=False)
    else:
        monkeypatch.setitem(sys.modules, name, trees)
    assert topology_cache._cudagraph_warmup(_cuda_like()) is warming


def test_nothing_is_kept_that_is_built_during_a_cudagraph_warm_up(monkeypatch):
    """Warm-up allocations live in the graphs' private pool, which the graphs free and poison later."""
    col = topology()
    monkeypatch.setattr(topology_cache, "_cudagraph_warmup", lambda c: True)
    first, second = lookup(col), lookup(col)
    assert first is not second and torch.equal(first, second)
    monkeypatch.setattr(topology_cache, "_cudagraph_warmup", lambda c: False)
    assert lookup(col) is lookup(col)
