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

Adding a method is one line in ``METHODS``.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace
from typing import TYPE_CHECKING

import torch
from _report import command, machine, parse_suite_args, write_report
from torch import Tensor, nn

from drt_peft import get_drt_model
from drt_peft.apps.offline import fashion_mnist, stratified_split
from drt_peft.config import config_class

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


class LeNet300100(nn.Module):
    """LeNet-300-100 (LeCun et al. 1998): 784 → 300 → 100 → 10 with ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 300), nn.Linear(300, 100), nn.Linear(100, 10)

    def forward(self, pixel_values: Tensor, labels: Tensor | None = None) -> SimpleNamespace:
        h = torch.relu(self.fc2(torch.relu(self.fc1(pixel_values.flatten(1)))))
        logits = self.fc3(h)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SimpleNamespace(loss=loss, logits=logits)


def _vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=28,
        patch_size=7,
        num_channels=1,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=10,
    )
    return ViTForImageClassification(config)


@dataclass(frozen=True)
class Net:
    build: Callable[[], nn.Module]
    targets: list[str] | str  # the weights DRT embeds
    dense_parts: list[str] | None  # small parts that train in full
    train_size: int  # a stratified subset of the 60,000 training images, to fit the machine
    calibration: int  # images the data-driven criteria score on


MODELS = {
    "LeNet-300-100": Net(LeNet300100, ["fc1", "fc2", "fc3"], None, 30_000, 1280),
    "ViT": Net(
        _vit,
        "all-linear",
        ["vit.embeddings", "layernorm_before", "layernorm_after", "vit.layernorm", "classifier"],
        12_000,
        512,
    ),
}


# -- data ----------------------------------------------------------------------------------------
def _data(quick: bool, train_size: int | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    if not quick:
        data = fashion_mnist()
        if train_size is not None:
            x, y = data["train"]
            chosen, _ = stratified_split(y.tolist(), len(y) - train_size, seed=0)
            data["train"] = (x[chosen], y[chosen])
        return data
    g = torch.Generator().manual_seed(0)  # a learnable stand-in: class-dependent mean images plus noise
    means = torch.rand(10, 1, 28, 28, generator=g)
    parts = {}
    for split, n in (("train", 512), ("test", 256)):
        y = torch.randint(0, 10, (n,), generator=g)
        parts[split] = ((means[y] + 0.5 * torch.rand(n, 1, 28, 28, generator=g)).clamp(0, 1), y)
    return parts


def _batches(x: Tensor, y: Tensor, batch_size: int, seed: int, epoch: int) -> list[dict[str, Tensor]]:
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return [
        {"pixel_values": x[order[i : i + batch_size]], "labels": y[order[i : i + batch_size]]}
        for i in range(0, len(y) - batch_size + 1, batch_size)
    ]


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    hits = sum(int((model(pixel_values=x[i : i + 1000]).logits.argmax(-1) == y[i : i + 1000]).sum()) for i in
               range(0, len(y), 1000))  # fmt: skip
    return hits / len(y)


# -- one process per (model, method, density, seed) ---------------------------------------------------------
def _train(model: nn.Module, data: dict, epochs: int, batch_size: int, seed: int) -> float:
    x, y = data["train"]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    update_masks = getattr(model, "update_masks", None)
    step = 0
    model.train()
    for epoch in range(epochs):
        for batch in _batches(x, y, batch_size, seed, epoch):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if update_masks is not None:
                update_masks(step, optimizer)
    return _accuracy(model, *data["test"])


def run_job(job: dict) -> dict:
    net = MODELS[job["model"]]
    data = _data(job["quick"], net.train_size)
    seed, epochs, batch_size = job["seed"], job["epochs"], job["batch_size"]
    if job["method"] == "dense":
        torch.manual_seed(seed)
        return {"dense": _train(net.build(), data, epochs, batch_size, seed)}
    method = METHODS[job["method"]]
    steps = epochs * (len(data["train"][1]) // batch_size)
    x, y = data["train"]
    calibration = _batches(x[: net.calibration], y[: net.calibration], batch_size, seed, 0)
    extra = {"update_frequency": max(1, steps // 16), "t_end": (3 * steps) // 4} if method.family == "DST" else {}
    if method.rounds:
        extra["rounds"] = 2 if job["quick"] else method.rounds
    results = {}
    for mode in MODES:
        torch.manual_seed(seed)  # the same init in both modes
        config = config_class(method.name)(
            density=job["density"], mode=mode, budget=method.budget, target_modules=net.targets,
            modules_to_save=net.dense_parts, seed=seed, **extra,
        )  # fmt: skip
        model = get_drt_model(net.build(), config, calibration_data=calibration)
        results[mode] = _train(model, data, epochs, batch_size, seed)
    return results


# -- the suite -----------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="synthetic images, LeNet, two densities, one seed")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--workers", type=int, default=2)
    suite = parse_suite_args(parser, "scratch_vision", run_job)
    if suite is None:
        return
    args = suite.args
    densities = {model: list(DENSITIES) for model in args.models}
    if args.quick:
        args.epochs, args.seeds, densities = 1, 1, {"LeNet-300-100": [DENSITIES[0], DENSITIES[-1]]}
    common = {"quick": args.quick, "epochs": args.epochs, "batch_size": args.batch_size}
    cells = [(model, "dense", None) for model in densities]
    cells += [(model, method, density) for model in densities for method in METHODS for density in densities[model]]
    jobs = {
        f"{model}-{method}{'' if density is None else f'-density{density:g}'}-seed{seed}": {
            **common, "model": model, "method": method, "density": density, "seed": seed,
        }
        for model, method, density in cells
        for seed in range(args.seeds)
    }  # fmt: skip
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    results = suite.run(jobs, workers=args.workers, threads=threads)
    table: dict[str, dict[str, dict[str, list[float]]]] = {}
    for name, job in jobs.items():
        for mode, acc in results[name].items():
            key = mode if job["density"] is None else f"{mode}@{job['density']}"
            table.setdefault(job["model"], {}).setdefault(job["method"], {}).setdefault(key, []).append(acc)
    report = {
        "command": command("scratch_vision.py"),
        "machine": machine(threads),
        "setup": {
            **common,
            "seeds": args.seeds,
            "optimizer": "Adam lr 1e-3",
            "models": {
                m: {
                    "train_size": None if args.quick else MODELS[m].train_size,
                    "densities": densities[m],
                    "calibration": MODELS[m].calibration,
                }
                for m in densities
            },
        },
        "methods": {name: {"budget": m.budget, "family": m.family} for name, m in METHODS.items()},
        "accuracy": table,
        "claims": _claims(table, densities),
    }
    write_report(args.out, report, _markdown, _plot)


def _mean(table: dict, model: str, method: str, key: str) -> float:
    return statistics.fmean(table[model][method][key])


def _claims(table: dict, densities: dict[str, list[float]]) -> dict[str, list[dict]]:
    """The survey's claims checked on every model: freeze vs prune (Fig. 9), DST vs PaI (Table 5)."""
    freeze_vs_prune, dst_vs_pai = [], []
    for model in table:
        for density in densities[model]:
            gaps = [
                _mean(table, model, m, f"freeze@{density}") - _mean(table, model, m, f"prune@{density}")
                for m in METHODS
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
            best = {
                family: max(_mean(table, model, m, f"prune@{density}") for m in METHODS if METHODS[m].family == family)
                for family in ("DST", "PaI")
            }
            dst_vs_pai.append({"model": model, "density": density, "best_dst": best["DST"], "best_pai": best["PaI"]})
    return {"freeze_vs_prune": freeze_vs_prune, "dst_vs_pai": dst_vs_pai}


def _markdown(report: dict) -> str:
    s, m = report["setup"], report["machine"]
    lines = [
        f"Fashion-MNIST{' (synthetic stand-in: harness check)' if s['quick'] else ''}, from a seeded random init, "
        f"{s['epochs']} epochs of batch {s['batch_size']}, {s['optimizer']}, mean over {s['seeds']} seed(s); "
        f"{m['threads']} thread(s) per run ({m['cpu']}, {m['cores']} cores, torch {m['torch']}). "
        f"Command: `{report['command']}`.",
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
            for mode in MODES:
                cells = [f"{100 * statistics.fmean(methods[name][f'{mode}@{d}']):.2f}" for d in densities]
                lines.append(f"| {name} | {mode} | " + " | ".join(cells) + " |")
        lines += ["", "Ranking in prune mode (best first):", ""]
        for d in densities:
            ranked = sorted(report["methods"], key=lambda n, d=d: -statistics.fmean(methods[n][f"prune@{d}"]))
            lines.append(f"- {100 * d:g}% trained: " + " > ".join(ranked))
    lines += [
        "",
        "### The survey's claims",
        "",
        "| model | trained | freeze − prune: mean (median) over methods | freeze better in | best DST | best PaI |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for fp, dp in zip(report["claims"]["freeze_vs_prune"], report["claims"]["dst_vs_pai"], strict=True):
        lines.append(
            f"| {fp['model']} | {100 * fp['density']:g}% | {100 * fp['mean_freeze_minus_prune']:+.2f} "
            f"({100 * fp['median_freeze_minus_prune']:+.2f}) | {fp['freeze_wins']}/{fp['methods']} "
            f"| {100 * dp['best_dst']:.2f} | {100 * dp['best_pai']:.2f} |"
        )
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
