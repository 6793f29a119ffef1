"""Run a test's worker in several CPU processes joined in one gloo process group.

:func:`run_ranks` is what the multi-process tests use instead of ``mp.spawn``:

- rendezvous: a ``TCPStore`` that this (the pytest) process serves on a port the OS assigns as it
  binds (port 0) and holds until every rank has exited, so no port is chosen before it is bound
  and no rank's exit takes the store away from the others;
- each rank is a fresh interpreter (start method ``spawn``, daemonic: it dies with the parent),
  runs on one thread, and joins the group with a timeout on every collective (two thirds of the
  test's, so a rank stuck in a collective fails with its traceback before the parent kills it);
- teardown: after the worker returns, a barrier (no rank tears down its end of gloo while a peer
  still communicates), then ``destroy_process_group`` on every path, then ``os._exit``. Exiting
  without interpreter finalization matters: after FSDP, torch's DTensor caches keep the process
  group, and with it gloo's threads, alive past ``destroy_process_group``, and C++ teardown with
  those threads running can abort the process (SIGABRT, "terminate called without an active
  exception") after the test's work is done;
- the parent waits at most ``timeout`` seconds: a rank that raised fails the test with its
  traceback (``ProcessRaisedException``), one that crashed or hung with every rank's exit code.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HOST = "127.0.0.1"
#: Seconds a multi-process test may take before its ranks are killed and it fails.
TIMEOUT_S = float(os.environ.get("DRT_TEST_RANKS_TIMEOUT", 300))
#: Seconds the other ranks get to finish once one has failed.
GRACE_S = 30.0


def _loopback_interface() -> str | None:
    names = {name for _, name in socket.if_nameindex()} if hasattr(socket, "if_nameindex") else set()
    return next((name for name in ("lo", "lo0") if name in names), None)


def _rank_main(
    rank: int, world_size: int, port: int, folder: str, timeout_s: float, worker: Callable, args: tuple
) -> None:
    code = 0
    try:
        torch.set_num_threads(1)
        # what torchrun would set; accelerate reads these to find its place in the (already formed) group
        os.environ.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_WORLD_SIZE=str(world_size),
            MASTER_ADDR=HOST,
            MASTER_PORT=str(port),
        )
        timeout = timedelta(seconds=timeout_s * 2 / 3)
        store = dist.TCPStore(HOST, port, is_master=False, timeout=timeout)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
        try:
            worker(rank, *args)
            dist.barrier()
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    except BaseException:
        code = 1
        Path(folder, f"rank{rank}.error").write_text(traceback.format_exc())
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _describe(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running at the deadline (killed)"
    if exitcode < 0:
        try:
            return f"killed by signal {-exitcode} ({signal.Signals(-exitcode).name})"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def run_ranks(worker: Callable, *args: object, world_size: int = 2, timeout: float = TIMEOUT_S) -> None:
    """Run ``worker(rank, *args)`` in ``world_size`` processes in one gloo group; return when all succeeded.

    ``worker`` must be a module-level function of an importable module (a test file), as the
    ranks are fresh interpreters. Raises ``torch.multiprocessing.ProcessRaisedException`` with the
    traceback of every rank that raised (the first to fail first), and fails the test naming each
    rank's exit code when a rank crashed or did not finish within ``timeout`` seconds.
    """
    context = multiprocessing.get_context("spawn")
    store = dist.TCPStore(HOST, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout))
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if "GLOO_SOCKET_IFNAME" not in os.environ and (loopback := _loopback_interface()):
        env["GLOO_SOCKET_IFNAME"] = loopback  # gloo talks over loopback, not the hostname's address
    with tempfile.TemporaryDirectory(prefix="drt-ranks-") as folder:
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)  # the children's environment, read when they start
        try:
            processes = [
                context.Process(
                    target=_rank_main,
                    args=(rank, world_size, store.port, folder, timeout, worker, args),
                    name=f"rank{rank}",
                    daemon=True,
                )
                for rank in range(world_size)
            ]
            for process in processes:
                process.start()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        finished: list[int] = []  # ranks in the order they exited
        try:
            deadline = time.monotonic() + timeout
            while len(finished) < world_size and (left := deadline - time.monotonic()) > 0:
                waiting = {p.sentinel: rank for rank, p in enumerate(processes) if rank not in finished}
                for sentinel in multiprocessing.connection.wait(list(waiting), timeout=left):
                    rank = waiting[sentinel]
                    processes[rank].join()
                    finished.append(rank)
                    if processes[rank].exitcode != 0:
                        deadline = min(deadline, time.monotonic() + GRACE_S)
        finally:
            for process in processes:
                if process.is_alive():
                    process.kill()
                process.join()
        hung = [rank for rank in range(world_size) if rank not in finished]
        errors = {rank: Path(folder, f"rank{rank}.error") for rank in finished}
        raised = [rank for rank in finished if errors[rank].exists()]
        status = ", ".join(
            f"rank {rank}: {_describe(None if rank in hung else p.exitcode)}" for rank, p in enumerate(processes)
        )
        if raised:
            traces = "".join(f"\n\n-- rank {rank} raised:\n{errors[rank].read_text()}" for rank in raised)
            raise mp.ProcessRaisedException(f"{worker.__name__}: {status}{traces}", raised[0], processes[raised[0]].pid)
        if hung or any(p.exitcode != 0 for p in processes):
            pytest.fail(f"{worker.__name__} failed without a traceback ({status}) after {timeout:.0f} s at most")
    del store
