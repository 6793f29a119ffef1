"""The multi-process harness itself: a rank that crashes or hangs fails the test with every rank's exit code."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ranks import run_ranks


def _all_reduce(rank: int, out: str) -> None:
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    torch.save(total, f"{out}/rank{rank}.pt")


def test_ranks_share_one_group(tmp_path) -> None:
    run_ranks(_all_reduce, str(tmp_path))
    assert [float(torch.load(tmp_path / f"rank{r}.pt")) for r in (0, 1)] == [3.0, 3.0]


def _rank1_aborts(rank: int) -> None:
    if rank == 1:
        os.abort()


def test_a_crashed_rank_is_named_with_its_signal() -> None:
    with pytest.raises(
        (mp.ProcessRaisedException, pytest.fail.Exception), match=r"rank 1: killed by signal 6 \(SIGABRT\)"
    ):
        run_ranks(_rank1_aborts, timeout=60)


def _rank1_hangs(rank: int) -> None:
    if rank == 1:
        time.sleep(3600)


def test_a_hung_rank_fails_the_test_at_the_deadline() -> None:
    start = time.monotonic()
    # rank 0's barrier times out first (collectives get two thirds of the time) and raises; rank 1 is killed
    with pytest.raises(
        (mp.ProcessRaisedException, pytest.fail.Exception), match="rank 1: still running at the deadline"
    ):
        run_ranks(_rank1_hangs, timeout=6)
    assert time.monotonic() - start < 30
