"""What every benchmark shares: the machine it ran on, memory probes, per-run jobs and the report writer."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch


def command(script: str) -> str:
    """The command line that produced the results, as the docs quote it."""
    return " ".join(["python", f"benchmarks/{script}", *sys.argv[1:]])


def machine(threads: int | None = None) -> dict:
    """CPU, thread count and library versions, recorded beside every result."""
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": threads or torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def write_report(out: str, report: dict, markdown: Callable[[dict], str]) -> None:
    """Write ``out.json`` and ``out.md`` atomically and print the markdown."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    _write_atomic(out + ".json", json.dumps(report, indent=2))
    _write_atomic(out + ".md", markdown(report))
    print(markdown(report))


def _write_atomic(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as handle:
        handle.write(text)
    os.replace(path + ".tmp", path)


# -- memory ---------------------------------------------------------------------------------
def rss_bytes() -> int:
    """Resident memory of this process now."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> None:
    """Reset the kernel's peak-RSS counter (VmHWM), so what ran before does not count."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def peak_bytes() -> int:
    """Peak resident memory of this process since the last :func:`reset_peak`."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line")


# -- one process per run ------------------------------------------------------------------------
def parse_suite_args(parser: argparse.ArgumentParser, name: str, run_job: Callable[[dict], dict]):
    """Add the arguments every suite shares (``--out``, ``--work``; ``--quick`` is the suite's own), parse.

    A ``--job`` (how :func:`run_jobs` starts a run) is run here and its JSON printed; None is
    returned then. ``--quick`` writes to the temporary folder, never over the docs, and starts
    afresh there, so a harness check never passes on results left by an earlier run.
    """
    parser.add_argument("--out", default=f"docs/benchmarks/{name}", help="where the report goes (.json/.md/.png)")
    parser.add_argument("--work", default=f"outputs/bench/{name}", help="where finished runs are kept")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        print(json.dumps(run_job(json.loads(args.job))))
        return None
    if args.quick:
        args.out = os.path.join(tempfile.gettempdir(), f"drt_{name}_quick")
        args.work = os.path.join(args.out, "runs")
        shutil.rmtree(args.work, ignore_errors=True)
    return args


def run_jobs(
    script: str,
    jobs: dict[str, dict],
    folder: str,
    *,
    workers: int = 1,
    threads: int = 1,
    inline: Callable[[dict], dict] | None = None,
) -> dict:
    """Run every job as ``python script --job JSON`` in its own process, ``workers`` at a time.

    A job's result is the JSON its process prints last; it is kept in ``folder/<name>.json``, and a
    job whose file exists is not run again, so an interrupted suite resumes where it stopped.
    With ``inline`` (the suite's ``run_job``; ``--quick`` runs), jobs run one after the other in
    this process instead, which saves a process start per job.
    """
    os.makedirs(folder, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    pending = [name for name in jobs if not os.path.exists(os.path.join(folder, f"{name}.json"))]
    for name in pending if inline is not None else []:
        start = time.perf_counter()
        result = json.loads(json.dumps(inline(jobs[name])))
        _write_atomic(os.path.join(folder, f"{name}.json"), json.dumps(result))
        print(f"[{time.perf_counter() - start:6.0f} s] {name}: {_summary(result)}", flush=True)
    pending = [] if inline is not None else pending
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    while pending or running:
        while pending and len(running) < workers:
            name = pending.pop(0)
            argv = [sys.executable, script, "--job", json.dumps(jobs[name])]
            process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            running[name] = (process, time.perf_counter())
        time.sleep(0.5)
        for name, (process, start) in list(running.items()):
            if process.poll() is None:
                continue
            del running[name]
            out, err = process.communicate()
            if process.returncode != 0:
                raise RuntimeError(f"job {name} failed:\n{err[-4000:]}")
            result = json.loads(out.strip().splitlines()[-1])
            _write_atomic(os.path.join(folder, f"{name}.json"), json.dumps(result))
            print(f"[{time.perf_counter() - start:6.0f} s] {name}: {_summary(result)}", flush=True)
    results = {}
    for name in jobs:
        with open(os.path.join(folder, f"{name}.json")) as handle:
            results[name] = json.load(handle)
    return results


def _summary(result: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in result.items() if isinstance(v, (int, float, str)))[:200]
