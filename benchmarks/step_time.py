"""Training step time, optimizer state and adapter size: DRT against full fine-tuning, LoRA and SHiRA.

A BERT-base-shaped classifier built from a config (hidden 768, 12 layers), batch 16 × 128, every
encoder linear layer targeted at 1% density; LoRA and SHiRA get the rank whose parameter count
matches d. All methods run in the same process, interleaved round by round, and the median step
time is reported. Writes JSON and a markdown table:

    python benchmarks/step_time.py                 # the full run (about 10 minutes on 2 cores)
    python benchmarks/step_time.py --quick         # a tiny model, to check the harness
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field

import torch
from _builders import ENCODER_LINEAR, adapter_bytes, lora_rank, peft_model, trainable_count, trainable_parameters
from _report import add_options, command, cpu_threads, machine, write_report
from transformers import BertConfig, BertForSequenceClassification

from drt_peft import MagnitudeConfig, RandomConfig, get_drt_model
from drt_peft.apps.recipes.text_classification import optimizer_state_bytes
from drt_peft.base_weights import PROBE_BYTES_PER_LAYER


@dataclass
class Run:
    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    times: list[float] = field(default_factory=list)


def _base(args: argparse.Namespace) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        intermediate_size=4 * args.hidden,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def _run(name: str, model: torch.nn.Module) -> Run:
    """A method to time: its model and an AdamW over what it trains."""
    return Run(name, model, torch.optim.AdamW(trainable_parameters(model), lr=1e-5))


def _build(args: argparse.Namespace) -> tuple[list[Run], dict]:
    runs = [_run("full fine-tuning", _base(args))]

    drt_random = get_drt_model(_base(args), RandomConfig(density=args.density, target_modules=ENCODER_LINEAR))
    d = sum(layer.num_trainable for _, layer in drt_random.drt_layers())
    rank = lora_rank(d, (layer.weight_shape for _, layer in drt_random.drt_layers()))
    for name, config in (
        ("DRT random (freeze)", None),
        ("DRT magnitude (freeze)", MagnitudeConfig(density=args.density, target_modules=ENCODER_LINEAR)),
        ("DRT random (prune)", RandomConfig(density=args.density, mode="prune", target_modules=ENCODER_LINEAR)),
    ):
        runs.append(_run(name, drt_random if config is None else get_drt_model(_base(args), config)))
    for kind, label in (("lora", "LoRA"), ("shira", "SHiRA")):
        runs.append(_run(f"PEFT {label} r={rank}", peft_model(_base(args), kind, rank, target_modules=ENCODER_LINEAR)))
    layers = [layer for _, layer in drt_random.drt_layers()]
    return runs, {"d": d, "rank": rank, "D": sum(layer.weight_shape.numel() for layer in layers), "layers": len(layers)}


def _step(run: Run, batch: dict) -> float:
    start = time.perf_counter()
    run.model(**batch).loss.backward()
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps (harness check)")
    add_options(parser, layers=12, hidden=768, batch=16, seq=128, density=0.01, rounds=4)
    parser.add_argument("--steps", type=int, default=3, help="steps per method per round")
    parser.add_argument("--out", default="docs/benchmarks/step_time")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.hidden, args.seq, args.rounds, args.steps = 2, 128, 32, 2, 2
        args.out = os.path.join(tempfile.gettempdir(), "drt_step_time_quick")

    runs, sizes = _build(args)
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, 20000, (args.batch, args.seq), generator=g),
        "labels": torch.randint(0, 2, (args.batch,), generator=g),
    }
    for run in runs:
        run.model.train()
        _step(run, batch)  # warm-up: allocations, CSR patterns, optimizer state
    for _ in range(args.rounds):
        for run in runs:
            run.times += [_step(run, batch) for _ in range(args.steps)]

    full_time = statistics.median(runs[0].times)
    lora_time = statistics.median(next(r for r in runs if r.name.startswith("PEFT LoRA")).times)
    d, probe = sizes["d"], PROBE_BYTES_PER_LAYER * sizes["layers"]
    rows = []
    for run in runs:
        median = statistics.median(run.times)
        rows.append(
            {
                "method": run.name,
                "trainable": trainable_count(run.model),
                "median_step_s": round(median, 4),
                "vs_full": round(median / full_time, 3),
                "vs_lora": round(median / lora_time, 3),
                "optimizer_state_bytes": optimizer_state_bytes(run.optimizer),
                "adapter_bytes": adapter_bytes(run.model),
            }
        )
    result = {
        "command": command("step_time.py"),
        "machine": machine(),
        "setup": {
            "layers": args.layers,
            "hidden": args.hidden,
            "batch": args.batch,
            "seq": args.seq,
            "density": args.density,
            "steps_timed": args.rounds * args.steps,
            **sizes,
        },
        "bounds": {
            "adapter_random_max": 4 * d + 4096 + probe,
            "adapter_magnitude_max": 6 * d + 4096 + probe,
            "optimizer_state_drt": 8 * d,
        },
        "rows": rows,
    }
    write_report(args.out, result, _markdown)


def _markdown(result: dict) -> str:
    s = result["setup"]
    lines = [
        f"BERT-shaped classifier from config: {s['layers']} layers, hidden {s['hidden']}, batch {s['batch']} × "
        f"{s['seq']}; all encoder linear layers targeted, density {s['density']} → d = {s['d']:,} of D = {s['D']:,}; "
        f"LoRA/SHiRA rank {s['rank']} (same parameter count). Median of {s['steps_timed']} AdamW steps per method, "
        f"interleaved; {cpu_threads(result)}",
        "",
        "| method | trainable | median step (s) | vs full | vs LoRA | optimizer state (bytes) | adapter file (bytes) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        adapter = f"{r['adapter_bytes']:,}" if r["adapter_bytes"] is not None else "—"
        lines.append(
            f"| {r['method']} | {r['trainable']:,} | {r['median_step_s']:.3f} | {r['vs_full']:.2f} "
            f"| {r['vs_lora']:.2f} | {r['optimizer_state_bytes']:,} | {adapter} |"
        )
    b = result["bounds"]
    lines += [
        "",
        f"Bounds: DRT optimizer state 8·d = {b['optimizer_state_drt']:,} bytes; adapter ≤ 4·d + 4 KB + "
        f"{PROBE_BYTES_PER_LAYER} B per targeted layer (the base probe) = {b['adapter_random_max']:,} bytes "
        f"(random mask), ≤ 6·d + 4 KB + {PROBE_BYTES_PER_LAYER} B per layer = {b['adapter_magnitude_max']:,} "
        "bytes (magnitude mask).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
