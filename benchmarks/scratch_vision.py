"""From scratch on Fashion-MNIST: the survey's claims (its §8 conclusions) on LeNet-300-100 and a small ViT.

Both networks start from a seeded random init. At densities 20, 10, 5, 2 and 1% (sparsities 80–99%)
of their linear weights, every method trains the same number of epochs on a fixed stratified
subset of the training images (30,000 for LeNet, 12,000 for the ViT, to fit a 2-core machine; all
10,000 test images) with Adam (lr 1e-3, batch 128), in prune mode (untrained entries zero) and in
freeze mode (untrained entries kept at their random init), for each seed; the dense network is the
reference. Methods: PaI random (ERK budget), magnitude, SNIP, GraSP, SynFlow (global budget); DST
SET and RigL (ERK budget, mask updates every 1/16 of training until 3/4 of it). The same seed
gives the same mask in both modes.

Reported: test accuracy per model × method × mode × density (mean over seeds), a plot of
accuracy against the trained fraction (the survey's Fig. 9), the ranking per density (its
Table 5) and which of the claims held. One process per (model, method, density, seed); finished runs are
kept under ``--work``, so an interrupted suite resumes.

    python benchmarks/scratch_vision.py             # the full suite (apt-get install dataset-fashion-mnist)
    python benchmarks/scratch_vision.py --quick     # synthetic images, few steps: checks the harness
    python benchmarks/scratch_vision.py --models LeNet-300-100 --train-size 60000 --epochs 20 \
        --densities 0.05 0.02 --modes prune --methods random SNIP SET RigL \
        --out docs/benchmarks/scratch_long     # the long setting the survey's DST claims need

Adding a method is one line in ``METHODS``.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from _builders import NETS, SCRATCH_OPTIONS, drt_model, image_batches, images, train_images
from _report import add_options, command, machine, parse_suite_args, provenance, write_report

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class Method:
    name: str  # registered drt_peft method
    budget: str
    family: str  # "PaI" or "DST"
    rounds: int | None = None  # for iterative criteria (SynFlow); --quick uses 2


METHODS: dict[str, Method] = {
    "random": Method("random", "erk", "PaI"),
    "magnitude": Method("magnitude", "global", "PaI"),
    "SNIP": Method("snip", "global", "PaI"),
    "GraSP": Method("grasp", "global", "PaI"),
    "SynFlow": Method("synflow", "global", "PaI", rounds=100),
    "SET": Method("set", "erk", "DST"),
    "RigL": Method("rigl", "erk", "DST"),
}
DENSITIES = (0.2, 0.1, 0.05, 0.02, 0.01)
MODES = ("prune", "freeze")
#: Test accuracies by model, method and ``mode@density`` (``dense`` for the reference), one per seed.
Table = dict[str, dict[str, dict[str, list[float]]]]


# -- one process per (model, method, density, seed) ---------------------------------------------------------
def run_job(job: dict) -> dict:
    """Test accuracy of the dense network, or of one method in both modes."""
    net = NETS[job["model"]]
    data = images(job["quick"], job.get("train_size") or net.train_size)
    seed, epochs, batch_size = job["seed"], job["epochs"], job["batch_size"]
    if job["method"] == "dense":
        torch.manual_seed(seed)
        return {"dense": train_images(net.build(), data, epochs, batch_size, seed)}
    method = METHODS[job["method"]]
    x, y = data["train"]
    calibration = image_batches(x[: net.calibration], y[: net.calibration], batch_size, seed, 0)
    steps = epochs * (len(y) // batch_size)
    rounds = {"rounds": 2 if job["quick"] else method.rounds} if method.rounds else {}
    results = {}
    for mode in job.get("modes", MODES):
        torch.manual_seed(seed)  # the same init in both modes
        model = drt_model(
            net.build(), method.name, job["density"], steps, calibration, divisions=16, mode=mode,
            budget=method.budget, target_modules=net.targets, modules_to_save=net.dense_parts, seed=seed, **rounds,
        )  # fmt: skip
        results[mode] = train_images(model, data, epochs, batch_size, seed)
    return results


# -- the suite: jobs, aggregate, render ----------------------------------------------------------
def _jobs(common: dict, densities: dict[str, list[float]], methods: list[str], seeds: int) -> dict[str, dict]:
    """A run per model, method, density and seed; the dense reference per model and seed."""
    cells = [(model, "dense", None) for model in densities]
    cells += [(model, method, density) for model in densities for method in methods for density in densities[model]]
    return {
        f"{model}-{method}{'' if density is None else f'-density{density:g}'}-seed{seed}": {
            **common, "model": model, "method": method, "density": density, "seed": seed,
        }
        for model, method, density in cells
        for seed in range(seeds)
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="synthetic images, LeNet, two densities, one seed")
    parser.add_argument("--models", nargs="+", default=list(NETS), choices=list(NETS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--densities", nargs="+", type=float, default=list(DENSITIES), help="trained fractions")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument(
        "--train-size", type=int, help="training images (default: each model's subset; 60000 is all of them)"
    )
    add_options(parser, **SCRATCH_OPTIONS)
    suite = parse_suite_args(parser, "scratch_vision", run_job)
    if suite is None:
        return
    args = suite.args
    densities = {model: args.densities for model in args.models}
    if args.quick:
        args.epochs, args.seeds, densities = 1, 1, {"LeNet-300-100": [args.densities[0], args.densities[-1]]}
    modes = [mode for mode in MODES if mode in args.modes]
    common = {"quick": args.quick, "epochs": args.epochs, "batch_size": args.batch_size, "modes": modes}
    if args.train_size:
        common["train_size"] = args.train_size
    jobs = _jobs(common, densities, args.methods, args.seeds)
    table = _table(jobs, suite.run(jobs))
    nets = {m: {"train_size": None if args.quick else args.train_size or NETS[m].train_size, "densities": densities[m],
                "calibration": NETS[m].calibration} for m in densities}  # fmt: skip
    report = {
        "command": command("scratch_vision.py"),
        "machine": machine(suite.threads),
        "setup": {**common, "seeds": args.seeds, "optimizer": "Adam lr 1e-3", "models": nets},
        "methods": {name: {"budget": METHODS[name].budget, "family": METHODS[name].family} for name in args.methods},
        "accuracy": table,
        "claims": _claims(table, densities, args.methods, modes),
    }
    write_report(args.out, report, _markdown, _plot)


def _table(jobs: dict[str, dict], results: dict[str, dict]) -> Table:
    """The runs' accuracies gathered into a :data:`Table`."""
    table: Table = {}
    for name, job in jobs.items():
        for mode, acc in results[name].items():
            key = mode if job["density"] is None else f"{mode}@{job['density']}"
            table.setdefault(job["model"], {}).setdefault(job["method"], {}).setdefault(key, []).append(acc)
    return table


def _mean(table: Table, model: str, method: str, key: str) -> float:
    return statistics.fmean(table[model][method][key])


def _claims(
    table: Table, densities: dict[str, list[float]], methods: list[str], modes: list[str]
) -> dict[str, list[dict]]:
    """The survey's claims checked on every model, where the run has what they compare: freeze vs prune (Fig. 9),
    DST vs PaI in prune mode (Table 5)."""
    freeze_vs_prune: list[dict] = []
    dst_vs_pai: list[dict] = []
    families = {METHODS[m].family for m in methods}
    for model in table:
        for density in densities[model]:
            if "prune" in modes and families == {"DST", "PaI"}:
                best = {
                    fam: max(_mean(table, model, m, f"prune@{density}") for m in methods if METHODS[m].family == fam)
                    for fam in ("DST", "PaI")
                }  # fmt: skip
                dst_vs_pai.append(
                    {"model": model, "density": density, "best_dst": best["DST"], "best_pai": best["PaI"]}
                )
            if len(modes) < 2:
                continue
            gaps = [
                _mean(table, model, m, f"freeze@{density}") - _mean(table, model, m, f"prune@{density}")
                for m in methods
            ]
            freeze_vs_prune.append(
                {
                    "model": model,
                    "density": density,
                    "mean_freeze_minus_prune": statistics.fmean(gaps),
                    "median_freeze_minus_prune": statistics.median(gaps),
                    "freeze_wins": sum(g > 0 for g in gaps),
                    "methods": len(gaps),
                }
            )
    return {"freeze_vs_prune": freeze_vs_prune, "dst_vs_pai": dst_vs_pai}


def _markdown(report: dict) -> str:
    s, m = report["setup"], report["machine"]
    lines = [
        f"Fashion-MNIST{' (synthetic stand-in: harness check)' if s['quick'] else ''}, from a seeded random init, "
        f"{s['epochs']} epochs of batch {s['batch_size']}, {s['optimizer']}, mean over {s['seeds']} seed(s); "
        f"{m['threads']} thread(s) per run {provenance(report)}",
    ]
    for model, methods in report["accuracy"].items():
        dense = statistics.fmean(methods["dense"]["dense"])
        densities, size = s["models"][model]["densities"], s["models"][model]["train_size"]
        lines += [
            "",
            f"### {model} (dense: {100 * dense:.2f}%; {size or 'all'} training images, data-driven criteria "
            f"scored on {s['models'][model]['calibration']})",
            "",
            "| method | mode | " + " | ".join(f"{100 * d:g}%" for d in densities) + " |",
            "|---|---|" + "---:|" * len(densities),
        ]
        for name in report["methods"]:
            for mode in s["modes"]:
                cells = [f"{100 * statistics.fmean(methods[name][f'{mode}@{d}']):.2f}" for d in densities]
                lines.append(f"| {name} | {mode} | " + " | ".join(cells) + " |")
        lines += ["", "Ranking in prune mode (best first):", ""] if "prune" in s["modes"] else []
        for d in densities if "prune" in s["modes"] else []:
            ranked = sorted(report["methods"], key=lambda n, d=d: -statistics.fmean(methods[n][f"prune@{d}"]))
            lines.append(f"- {100 * d:g}% trained: " + " > ".join(ranked))
    claims = report["claims"]
    if claims["freeze_vs_prune"]:
        lines += [
            "",
            "### The survey's claims: freeze vs prune",
            "",
            "| model | trained | freeze − prune: mean (median) over methods | freeze better in |",
            "|---|---:|---:|---:|",
        ]
        for fp in claims["freeze_vs_prune"]:
            lines.append(
                f"| {fp['model']} | {100 * fp['density']:g}% | {100 * fp['mean_freeze_minus_prune']:+.2f} "
                f"({100 * fp['median_freeze_minus_prune']:+.2f}) | {fp['freeze_wins']}/{fp['methods']} |"
            )
    if claims["dst_vs_pai"]:
        lines += ["", "### The survey's claims: DST vs PaI (prune mode)", "",
                  "| model | trained | best DST | best PaI |", "|---|---:|---:|---:|"]  # fmt: skip
        for dp in claims["dst_vs_pai"]:
            best = f"{100 * dp['best_dst']:.2f} | {100 * dp['best_pai']:.2f}"
            lines.append(f"| {dp['model']} | {100 * dp['density']:g}% | {best} |")
    return "\n".join(lines) + "\n"


def _plot(report: dict, plt: ModuleType) -> Figure:
    models = list(report["accuracy"])
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        methods = report["accuracy"][model]
        densities = report["setup"]["models"][model]["densities"]
        dense = 100 * statistics.fmean(methods["dense"]["dense"])
        floor, clipped = dense - 25, []  # collapsed runs (layer collapse) would squash the rest
        for i, name in enumerate(report["methods"]):
            for mode, style in (("prune", "--"), ("freeze", "-")):
                if mode not in report["setup"]["modes"]:
                    continue
                acc = [100 * statistics.fmean(methods[name][f"{mode}@{d}"]) for d in densities]
                clipped += [
                    f"{name} {mode} {100 * d:g}%: {a:.0f}%" for d, a in zip(densities, acc, strict=True) if a < floor
                ]
                ax.plot([100 * d for d in densities], [max(a, floor) for a in acc], style, marker="o", color=f"C{i}",
                        label=f"{name} ({mode})", markersize=3)  # fmt: skip
        ax.axhline(dense, color="black", lw=0.8, label="dense")
        if clipped:
            ax.text(0.02, 0.02, "drawn at the floor: " + "; ".join(clipped), transform=ax.transAxes, fontsize=6)
        ax.set_xscale("log")
        ax.set_xlabel("trained fraction of the linear weights (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{model} on Fashion-MNIST: freeze (solid) vs prune (dashed)", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6, ncol=2, loc="lower right")
    return fig


if __name__ == "__main__":
    main()
