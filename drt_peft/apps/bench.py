"""``drt-peft bench``: run the benchmark suites of a source checkout (``benchmarks/``).

Each suite is a script that writes its JSON, markdown table and plot under ``docs/benchmarks/``
(``--quick``: a tiny configuration written to the temporary folder, to check the harness).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

#: Suite name → script in ``benchmarks/``, in the order ``drt-peft bench`` runs them.
SUITES = {
    "text": "finetune_text.py",
    "decoder": "decoder_lm.py",
    "vision": "finetune_vision.py",
    "scratch": "scratch_vision.py",
    "embeddings": "scratch_embeddings.py",
    "kernels": "layer_kernels.py",
    "pruned-inference": "pruned_inference.py",
    "step-time": "step_time.py",
    "scoring": "scoring.py",
    "mask-diagnostics": "mask_diagnostics.py",
    "mask-ablations": "mask_ablations.py",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suites", nargs="*", metavar="SUITE", help=f"suites to run: {', '.join(SUITES)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny configurations: checks that every suite runs")
    parser.add_argument(
        "--benchmarks-dir", default=None, help="the checkout's benchmarks/ folder (default: found from here)"
    )


def _benchmarks_dir(given: str | None) -> str:
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    candidates = [given] if given else [os.path.join(os.getcwd(), "benchmarks"), os.path.join(checkout, "benchmarks")]
    for folder in candidates:
        if folder and os.path.isfile(os.path.join(folder, SUITES["text"])):
            return os.path.abspath(folder)
    raise FileNotFoundError(
        f"no benchmarks/ folder with the suites at {candidates}; the benchmarks run from a source checkout: "
        "clone the repository, run `bash scripts/setup.sh bench` and call drt-peft bench from its root"
    )


def run(args: argparse.Namespace) -> int:
    unknown = [suite for suite in args.suites if suite not in SUITES]
    if unknown:
        print(f"error: unknown suite(s) {unknown}; choose from {list(SUITES)}")
        return 2
    try:
        folder = _benchmarks_dir(args.benchmarks_dir)
    except FileNotFoundError as err:
        print(f"error: {err}")
        return 1
    failed = []
    for suite in args.suites or list(SUITES):
        argv = [sys.executable, os.path.join(folder, SUITES[suite]), *(["--quick"] if args.quick else [])]
        print(f"== {suite}: {' '.join(argv[1:])}", flush=True)
        start = time.perf_counter()
        code = subprocess.run(argv, cwd=os.path.dirname(folder), check=False).returncode
        print(f"== {suite}: {'ok' if code == 0 else f'failed ({code})'} in {time.perf_counter() - start:.0f} s")
        if code:
            failed.append(suite)
    if failed:
        print(f"error: suites {failed} failed")
    return 1 if failed else 0
