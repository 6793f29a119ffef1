"""Lottery tickets, supermasks and the other embeddings on LeNet-300-100 / Fashion-MNIST, from scratch.

Every method trains the network from the same seeded random init with the set-up of
``scratch_vision.py`` (the same 30,000 training images, Adam lr 1e-3, batch 128, the same epochs
per training), at a trained
fraction of about ``--density`` of the linear weights where the method has one. Lottery tickets
and prune-or-freeze run their whole search (every round trains that many epochs); the table
says how many trainings each needed. Rows with a different budget by nature say so.

    python benchmarks/scratch_embeddings.py             # apt-get install dataset-fashion-mnist
    python benchmarks/scratch_embeddings.py --quick     # synthetic images: checks the harness

Adding a method is one line in ``METHODS``.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable

import torch
from _builders import NETS, SCRATCH_OPTIONS, LeNet300100, image_batches, images, train_images
from _report import add_options, command, machine, mean_std, parse_suite_args, percent, write_report
from torch import nn

from drt_peft import (
    DCTSparseConfig,
    DRTConfig,
    FixedClassifierConfig,
    IntrinsicDimensionConfig,
    LotteryTicketConfig,
    NormBiasConfig,
    PruneOrFreezeConfig,
    RandomConfig,
    SupermaskConfig,
    find_lottery_ticket,
    get_drt_model,
)

LINEAR = ["fc1", "fc2", "fc3"]
#: name → (config from (density, seed, optimizer steps per epoch), what trains)
METHODS: dict[str, tuple[Callable[[float, int, int], DRTConfig], str]] = {
    "random freeze (reference)": (lambda d, s, e: RandomConfig(density=d, target_modules=LINEAR, seed=s), "d entries"),
    "random prune (reference)": (
        lambda d, s, e: RandomConfig(density=d, mode="prune", target_modules=LINEAR, seed=s), "d entries"),
    "lottery ticket, iterative (reset)": (
        lambda d, s, e: LotteryTicketConfig(density=d, target_modules=LINEAR, seed=s), "d entries"),
    "lottery ticket, one-shot, rewind 1 epoch": (
        lambda d, s, e: LotteryTicketConfig(density=d, one_shot=True, rewind_step=e, target_modules=LINEAR, seed=s),
        "d entries"),
    "prune-or-freeze (one-shot)": (lambda d, s, e: PruneOrFreezeConfig(density=d, target_modules=LINEAR, seed=s),
                                   "d entries"),
    "supermask top-k (scores; keeps 50%)": (
        lambda d, s, e: SupermaskConfig(density=0.5, target_modules=LINEAR, seed=s), "D scores"),
    "supermask signed (keeps 50%)": (
        lambda d, s, e: SupermaskConfig(density=0.5, variant="signed", target_modules=LINEAR, seed=s), "D scores"),
    "intrinsic dimension (Fastfood)": (
        lambda d, s, e: IntrinsicDimensionConfig(density=d, target_modules=LINEAR, base_init="seeded", seed=s),
        "d global"),
    "DCT + sparse": (lambda d, s, e: DCTSparseConfig(density=d, target_modules=["fc1", "fc2"], seed=s,
                                                  modules_to_save=["fc3"]), "d entries + fc3"),
    "bias only": (lambda d, s, e: NormBiasConfig(train="bias", target_modules=LINEAR, seed=s), "biases"),
    "fixed orthogonal classifier": (
        lambda d, s, e: FixedClassifierConfig(target_modules=["fc3"], modules_to_save=["fc1", "fc2"], seed=s),
        "fc1, fc2 + α"),
}  # fmt: skip


def run_job(job: dict) -> dict:
    data = images(job["quick"], NETS["LeNet-300-100"].train_size)
    epochs, batch_size, seed, density = job["epochs"], job["batch_size"], job["seed"], job["density"]
    make, _ = METHODS[job["method"]]
    config = make(density, seed, len(data["train"][1]) // batch_size)
    torch.manual_seed(seed)
    base = LeNet300100()
    if isinstance(config, LotteryTicketConfig):
        with tempfile.TemporaryDirectory() as folder:
            accuracies: list[float] = []

            def train_fn(model: nn.Module) -> dict[str, float]:
                accuracies.append(train_images(model, data, epochs, batch_size, seed))
                return {"accuracy": accuracies[-1]}

            ticket = find_lottery_ticket(base, config, train_fn, output_dir=folder, verbose=False)
        trained = ticket.get_nb_trainable_parameters()[0]
        return {"accuracy": accuracies[-1], "trainings": len(accuracies), "trained": trained}
    calibration = image_batches(*data["train"], batch_size, seed, 0)[:4]
    model = get_drt_model(base, config, calibration_data=calibration)
    accuracy = train_images(model, data, epochs, batch_size, seed)
    return {"accuracy": accuracy, "trainings": 1, "trained": model.get_nb_trainable_parameters()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="synthetic images, one epoch, one seed")
    add_options(parser, density=0.05, **SCRATCH_OPTIONS)
    suite = parse_suite_args(parser, "scratch_embeddings", run_job)
    if suite is None:
        return
    args = suite.args
    if args.quick:
        args.epochs, args.seeds, args.density = 1, 1, 0.5
    setup = {"quick": args.quick, "epochs": args.epochs, "batch_size": args.batch_size, "density": args.density}
    jobs = {
        f"{name}-seed{seed}".replace(" ", "_").replace(",", "").replace("(", "").replace(")", "").replace(";", ""): {
            **setup, "method": name, "seed": seed}
        for name in METHODS
        for seed in range(args.seeds)
    }  # fmt: skip
    results = suite.run(jobs)
    rows = []
    for name, (_, what) in METHODS.items():
        runs = [results[key] for key, job in jobs.items() if job["method"] == name]
        mean, std = mean_std([r["accuracy"] for r in runs])
        rows.append(
            {
                "method": name,
                "trains": what,
                "accuracy_mean": mean,
                "accuracy_std": std,
                "trainings": runs[0]["trainings"],
                "trained": runs[0]["trained"],
            }
        )
    report = {
        "command": command("scratch_embeddings.py"),
        "machine": machine(suite.threads),
        "setup": {**setup, "seeds": args.seeds, "linear_weights": sum(m.weight.numel() for m in _linears())},
        "rows": rows,
    }
    write_report(args.out, report, _markdown)


def _linears() -> list[nn.Linear]:
    net = LeNet300100()
    return [net.fc1, net.fc2, net.fc3]


def _markdown(report: dict) -> str:
    s, m = report["setup"], report["machine"]
    lines = [
        f"LeNet-300-100 on Fashion-MNIST{' (synthetic stand-in: harness check)' if s['quick'] else ''} from a seeded "
        f"random init; {s['epochs']} epochs of batch {s['batch_size']} per training, Adam lr 1e-3, target trained "
        f"fraction {s['density']:g} of the {s['linear_weights']:,} linear weights; {s['seeds']} seed(s) "
        f"(mean ± std when more than one); {m['threads']} thread(s) per run ({m['cpu']}, torch {m['torch']}). "
        f"Command: `{report['command']}`.",
        "",
        "| method | what trains | trainable parameters | trainings | test accuracy |",
        "|---|---|---:|---:|---:|",
    ]
    for r in report["rows"]:
        accuracy = percent(r["accuracy_mean"], r["accuracy_std"])
        lines.append(f"| {r['method']} | {r['trains']} | {r['trained']:,} | {r['trainings']} | {accuracy} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
