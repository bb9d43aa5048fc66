"""tests/conftest.py's spawn_ranks: a rank killed by a signal (no Python exception) is run once more; a second
death, or a rank that raises, fails the caller."""

from __future__ import annotations

import os
import signal

import pytest
import torch.multiprocessing as mp

from tests.conftest import spawn_ranks


def _dies_once(rank: int, port: int, out_dir: str) -> None:
    marker = os.path.join(out_dir, f"tried{rank}")
    if not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGABRT)
    open(os.path.join(out_dir, f"done{rank}"), "w").close()


def _always_dies(rank: int, port: int, out_dir: str) -> None:
    os.kill(os.getpid(), signal.SIGABRT)


def _raises(rank: int, port: int, out_dir: str) -> None:
    raise ValueError("a failing assertion in a rank")


def test_a_rank_killed_by_a_signal_is_run_once_more(tmp_path):
    with pytest.warns(UserWarning, match="died of SIGABRT; running the ranks once more"):
        spawn_ranks(_dies_once, 1, tmp_path)
    assert (tmp_path / "done0").exists()


def test_a_second_death_or_a_python_error_fails_the_caller(tmp_path):
    with pytest.warns(UserWarning), pytest.raises(mp.ProcessExitedException, match="SIGABRT"):
        spawn_ranks(_always_dies, 1, tmp_path)
    with pytest.raises(mp.ProcessRaisedException, match="a failing assertion"):
        spawn_ranks(_raises, 1, tmp_path)
