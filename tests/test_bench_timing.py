"""benchmarks/timing.py's rounds: candidates alternate, each gets the median of its own rounds, and a
clock that drifts between rounds moves every candidate alike (a stand-in timer, no GPU)."""

import importlib.util
import pathlib

import pytest

HERE = pathlib.Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("timing", HERE.parent / "benchmarks" / "timing.py")
timing = importlib.util.module_from_spec(spec)
spec.loader.exec_module(timing)


def test_candidates_alternate_and_drift_cancels_in_their_ratio():
    calls = []
    base = {"dense": 1.0, "sparse": 0.5}

    def drifting_timer(fn, rep_ms):
        calls.append(fn())
        return base[calls[-1]] * (1 + 0.1 * ((len(calls) - 1) // 2))  # 10% slower every round

    result = timing.rounds_ms({"dense": lambda: "dense", "sparse": lambda: "sparse"}, rounds=3, timer=drifting_timer)
    assert calls == ["dense", "sparse"] * 3
    assert result["dense"]["rounds"] == pytest.approx([1.0, 1.1, 1.2])
    assert result["dense"]["ms"] / result["sparse"]["ms"] == pytest.approx(2.0)
    assert result["sparse"]["spread"] == pytest.approx(0.2 / 1.1)


def test_an_even_number_of_rounds_takes_the_middle_two_and_zero_rounds_is_refused():
    values = iter([3.0, 1.0, 2.0, 10.0])
    result = timing.rounds_ms({"a": lambda: None}, rounds=4, timer=lambda fn, rep_ms: next(values))
    assert result["a"]["ms"] == pytest.approx(2.5)
    with pytest.raises(ValueError, match="rounds must be at least 1, got 0"):
        timing.rounds_ms({"a": lambda: None}, rounds=0, timer=lambda fn, rep_ms: 1.0)
