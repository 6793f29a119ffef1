"""What every benchmark shares: the machine it ran on, memory probes, per-run jobs, flags and the report."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure


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


def write_report(
    out: str,
    report: dict,
    markdown: Callable[[dict], str],
    plot: Callable[[dict, ModuleType], Figure] | None = None,
    *,
    echo: bool = True,
) -> None:
    """Write ``out.json``, ``out.md`` and, given ``plot``, ``out.png``, each atomically; print the markdown (unless
    ``echo`` is False: a report kept up to date while a suite runs).

    ``plot(report, pyplot)`` draws with the non-interactive backend and returns its figure.
    """
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    _write_atomic(out + ".json", json.dumps(report, indent=2))
    _write_atomic(out + ".md", markdown(report))
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure = plot(report, plt)
        figure.tight_layout()
        figure.savefig(out + ".tmp.png", dpi=120)
        plt.close(figure)
        os.replace(out + ".tmp.png", out + ".png")
    if echo:
        print(markdown(report))


def pool_for_every_thread_count() -> None:
    """Launch numba's thread pool with every core, for a suite that measures one thread count after another: drt_peft
    otherwise launches it at the first kernel call with torch's thread count then, which later calls cannot
    exceed."""
    os.environ.setdefault("NUMBA_NUM_THREADS", str(os.cpu_count() or 1))


def percent(mean: float, std: float | None) -> str:
    """A fraction as a percentage, ``mean ± std`` over runs (the mean alone when one run gave no std)."""
    return f"{100 * mean:.2f}" if std is None else f"{100 * mean:.2f} ± {100 * std:.2f}"


def lr_grid_lines(rows: list[dict], name: str, measure: str = "accuracy", over: str = "seed 0") -> list[str]:
    """Markdown lines listing each row's validation ``measure`` per learning rate (``row[name]``: its label; ``over``:
    the seeds it is taken over): an accuracy in percent, or a loss as it is."""
    lines = ["", f"Validation {measure} ({over}) per learning rate:", ""]
    shown = "{:.3f}".format if measure.endswith("loss") else lambda acc: f"{100 * acc:.2f}"
    for r in rows:
        grid = ", ".join(f"{lr}: {shown(value)}" for lr, value in r["lr_grid_val"].items())
        lines.append(f"- {r[name]}: {grid}")
    return lines


def provenance(report: dict) -> str:
    """An intro's closing words: the CPU, its cores and the torch version in brackets, then the command."""
    m = report["machine"]
    return f"({m['cpu']}, {m['cores']} cores, torch {m['torch']}). Command: `{report['command']}`."


def cpu_threads(report: dict) -> str:
    """An intro's closing words for a run in one process: its CPU threads, the torch version, the command."""
    m = report["machine"]
    return f"{m['threads']} CPU threads, torch {m['torch']}. Command: `{report['command']}`."


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard deviation over runs (None for the std of a single run)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def size(n: int) -> str:
    """A byte count in the largest binary unit it reaches (GiB, MiB, KiB), to one decimal."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def mib(n: int, digits: int) -> str:
    """A byte count in MiB with ``digits`` decimals, without the unit."""
    return f"{n / 2**20:.{digits}f}"


def interleaved_ms(fns: dict[str, Callable[[], object]], repeats: int, calls: int = 1) -> dict[str, list[float]]:
    """Milliseconds per call of each function, ``repeats`` samples of ``calls`` calls each, the functions taking
    turns sample by sample (so drift on a shared machine reaches all alike); one untimed call each first."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append(1e3 * (time.perf_counter() - start) / calls)
    return times


def quartiles(values: list[float]) -> dict[str, float]:
    """The median and the first and third quartiles of ``values`` (all three the value itself for one value)."""
    if len(values) < 2:
        return dict.fromkeys(("q1", "median", "q3"), values[0])
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"q1": q1, "median": median, "q3": q3}


def spread(stats: dict[str, float], digits: int = 3) -> str:
    """``median (q1–q3)`` of :func:`quartiles`, for tables."""
    return f"{stats['median']:.{digits}f} ({stats['q1']:.{digits}f}–{stats['q3']:.{digits}f})"


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


class PeakMemory:
    """The peak resident memory added from its creation on, over the memory resident then."""

    def __init__(self) -> None:
        self.before = rss_bytes()
        reset_peak()

    def added(self) -> int:
        """Bytes the peak so far stands above the memory at the start (0 when it does not)."""
        return max(0, peak_bytes() - self.before)


# -- one process per run ------------------------------------------------------------------------
@dataclass(frozen=True)
class Suite:
    """A suite's parsed arguments and how its runs run: one process each, or in-process for ``--quick``."""

    args: argparse.Namespace
    script: str
    run_job: Callable[[dict], dict]

    @property
    def workers(self) -> int:
        """Runs going at a time: the suite's ``--workers``, one for a suite without it."""
        return getattr(self.args, "workers", 1)

    @property
    def threads(self) -> int:
        """Threads for each of the runs going at a time: the cores shared out, at least one."""
        return max(1, (os.cpu_count() or 1) // self.workers)

    def run(self, jobs: dict[str, dict], *, threads: int | None = None) -> dict:
        """Run every job not finished yet; return every job's result, by name.

        A job's result is kept in ``<work>/<name>.json`` beside the job's settings; a job kept
        with the same settings is not run again, so an interrupted suite resumes where it stopped,
        and one whose settings changed runs afresh. A full run starts
        ``python script --job JSON`` per job, :attr:`workers` at a time with ``threads`` threads
        each (default :attr:`threads`), its output and log in ``<work>/<name>.out`` / ``.log``;
        ``--quick`` runs the jobs one after the other in this process, which saves a process start
        per job.
        """
        folder = self.args.work
        os.makedirs(folder, exist_ok=True)
        jobs = json.loads(json.dumps(jobs))  # as they are kept: tuples become lists
        results = {name: self._kept(name, job) for name, job in jobs.items()}
        pending = [name for name, result in results.items() if result is None]
        if self.args.quick:
            for name in pending:
                start = time.perf_counter()
                results[name] = self._keep(name, jobs[name], self.run_job(jobs[name]), start)
            pending = []
        env = {**os.environ, "OMP_NUM_THREADS": str(threads or self.threads), "TOKENIZERS_PARALLELISM": "false"}
        running: dict[str, tuple[subprocess.Popen, float]] = {}
        while pending or running:
            while pending and len(running) < self.workers:
                name = pending.pop(0)
                argv = [sys.executable, self.script, "--job", json.dumps(jobs[name])]
                base = os.path.join(folder, name)
                with open(f"{base}.out", "w") as out, open(f"{base}.log", "w") as log:
                    running[name] = (subprocess.Popen(argv, stdout=out, stderr=log, env=env), time.perf_counter())
            time.sleep(0.5)
            for name, (process, start) in list(running.items()):
                if process.poll() is None:
                    continue
                del running[name]
                base = os.path.join(folder, name)
                if process.returncode != 0:
                    for other, _ in running.values():
                        other.terminate()  # the suite stops here; what finished is kept
                    with open(f"{base}.log") as log:
                        raise RuntimeError(f"job {name} failed (log: {base}.log):\n{log.read()[-4000:]}")
                with open(f"{base}.out") as out:
                    result = json.loads(out.read().strip().splitlines()[-1])
                results[name] = self._keep(name, jobs[name], result, start)
        return results

    def _kept(self, name: str, job: dict) -> dict | None:
        path = os.path.join(self.args.work, f"{name}.json")
        if not os.path.exists(path):
            return None
        with open(path) as handle:
            kept = json.load(handle)
        if kept.get("job") != job:
            print(f"{path} was run with other settings; running {name} again", flush=True)
            return None
        return kept["result"]

    def _keep(self, name: str, job: dict, result: dict, start: float) -> dict:
        result = json.loads(json.dumps(result))
        _write_atomic(os.path.join(self.args.work, f"{name}.json"), json.dumps({"job": job, "result": result}))
        print(f"[{time.perf_counter() - start:6.0f} s] {name}: {_summary(result)}", flush=True)
        return result


def add_options(parser: argparse.ArgumentParser, **defaults: float) -> None:
    """A ``--flag`` per keyword (``batch_size`` gives ``--batch-size``), of its default's type."""
    for name, default in defaults.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)


def parse_suite_args(parser: argparse.ArgumentParser, name: str, run_job: Callable[[dict], dict]) -> Suite | None:
    """Add the arguments every suite shares (``--out``, ``--work``; ``--quick`` is the suite's own), parse.

    A ``--job`` (how :meth:`Suite.run` starts a run) is run here and its JSON printed; None is
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
    return Suite(args, os.path.abspath(sys.modules[run_job.__module__].__file__), run_job)


def _summary(result: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in result.items() if isinstance(v, (int, float, str)))[:200]
