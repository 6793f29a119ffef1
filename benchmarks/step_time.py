"""Training step time, optimizer state and adapter size: DRT against full fine-tuning, LoRA and SHiRA.

Two BERT classifiers built from configs, batch 16 × 128: the MiniLM-L6 shape (hidden 384, 6 layers)
and the BERT-base width (hidden 768; 4 of its 12 layers by default, ``--bert-layers`` for more:
the per-layer products are what differ between methods). Every encoder linear layer is targeted
at 1% density; PEFT LoRA and SHiRA get the rank whose parameter count matches d. For each shape and
each CPU thread count (1, 2 and, where the machine has them, 4 and 8), all methods run in one
process, interleaved: ``--rounds`` rounds of ``--steps`` AdamW steps per method. Reported: each
method's median step with its quartiles, and its ratio to full fine-tuning and to LoRA as the
median and range of the per-round ratios (single short runs move by ±0.1 on a shared 2-core
machine). Writes JSON and a markdown table:

    python benchmarks/step_time.py                 # about 15 minutes on 2 idle cores
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
from _report import add_options, command, machine, pool_for_every_thread_count, write_report
from transformers import BertConfig, BertForSequenceClassification

from drt_peft import DRTModel, RandomConfig, get_drt_model
from drt_peft.apps.recipes.text_classification import optimizer_state_bytes
from drt_peft.base_weights import PROBE_BYTES_PER_LAYER

#: The targets at 1% density: (method, against, shape or None for every shape, bound).
TARGETS = (
    ("DRT freeze", "LoRA", None, 0.95),
    ("DRT freeze", "full", "bert-base", 0.75),
    ("DRT prune", "full", "bert-base", 0.65),
)


@dataclass
class Run:
    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    times: dict[int, list[list[float]]] = field(default_factory=dict)  # threads → rounds → step times


def _shapes(args: argparse.Namespace) -> dict[str, dict[str, int]]:
    if args.quick:
        return {"tiny": {"hidden": 128, "layers": 2}}
    return {"minilm": {"hidden": 384, "layers": 6}, "bert-base": {"hidden": 768, "layers": args.bert_layers}}


def _base(hidden: int, layers: int) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        intermediate_size=4 * hidden,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def _run(name: str, model: torch.nn.Module) -> Run:
    """A method to time: its model and an AdamW over what it trains."""
    return Run(name, model, torch.optim.AdamW(trainable_parameters(model), lr=1e-5))


def _build(shape: dict[str, int], density: float) -> tuple[list[Run], dict]:
    runs = [_run("full", _base(**shape))]
    for mode in ("freeze", "prune"):
        config = RandomConfig(density=density, mode=mode, target_modules=ENCODER_LINEAR)
        runs.append(_run(f"DRT {mode}", get_drt_model(_base(**shape), config)))
    layers = [layer for _, layer in runs[1].model.drt_layers()]
    d = sum(layer.num_trainable for layer in layers)
    rank = lora_rank(d, (layer.weight_shape for layer in layers))
    for kind, label in (("lora", "LoRA"), ("shira", "SHiRA")):
        runs.append(_run(label, peft_model(_base(**shape), kind, rank, target_modules=ENCODER_LINEAR)))
    sizes = {"d": d, "rank": rank, "D": sum(layer.weight_shape.numel() for layer in layers), "targeted": len(layers)}
    return runs, sizes


def _step(run: Run, batch: dict) -> float:
    start = time.perf_counter()
    run.model(**batch).loss.backward()
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def _time(runs: list[Run], batch: dict, threads: int, rounds: int, steps: int) -> None:
    torch.set_num_threads(threads)
    for run in runs:
        _step(run, batch)  # warm-up at this thread count: allocations, CSR patterns, compiled kernels
        run.times[threads] = []
    for _ in range(rounds):
        for run in runs:
            run.times[threads].append([_step(run, batch) for _ in range(steps)])


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def _ratios(run: Run, reference: Run, threads: int) -> dict[str, float]:
    """The per-round ratio of median step times: its median and range."""
    per_round = [
        statistics.median(mine) / statistics.median(theirs)
        for mine, theirs in zip(run.times[threads], reference.times[threads], strict=True)
    ]
    return {"median": statistics.median(per_round), "min": min(per_round), "max": max(per_round)}


def _kernels(model: torch.nn.Module) -> list[str]:
    """The weight-gradient kernels the DRT layers used at their last backward."""
    if not isinstance(model, DRTModel):
        return []
    return sorted({str(layer.op.last_grad_kernel) for _, layer in model.drt_layers()})


def _measure_shape(name: str, shape: dict[str, int], args: argparse.Namespace, threads: list[int]) -> dict:
    runs, sizes = _build(shape, args.density)
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, 20000, (args.batch, args.seq), generator=g),
        "labels": torch.randint(0, 2, (args.batch,), generator=g),
    }
    for run in runs:
        run.model.train()
    for count in threads:
        _time(runs, batch, count, args.rounds, args.steps)
    full, lora = runs[0], next(run for run in runs if run.name == "LoRA")
    rows = []
    for run in runs:
        timings = {}
        for count in threads:
            q1, median, q3 = _quartiles([t for steps in run.times[count] for t in steps])
            timings[str(count)] = {
                "median_s": round(median, 4),
                "q1_s": round(q1, 4),
                "q3_s": round(q3, 4),
                "vs_full": {k: round(v, 3) for k, v in _ratios(run, full, count).items()},
                "vs_lora": {k: round(v, 3) for k, v in _ratios(run, lora, count).items()},
            }
        rows.append(
            {
                "method": run.name,
                "trainable": trainable_count(run.model),
                "optimizer_state_bytes": optimizer_state_bytes(run.optimizer),
                "adapter_bytes": adapter_bytes(run.model),
                "weight_gradient_kernels": _kernels(run.model),
                "threads": timings,
            }
        )
    return {"shape": name, **shape, **sizes, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    pool_for_every_thread_count()
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps (harness check)")
    add_options(parser, batch=16, seq=128, density=0.01, rounds=4, steps=4, bert_layers=4)
    parser.add_argument("--threads", default=None, help="thread counts, e.g. 1,2 (default 1, 2, 4, 8 up to cores)")
    parser.add_argument("--out", default="docs/benchmarks/step_time")
    args = parser.parse_args()
    if args.quick:
        args.seq, args.rounds, args.steps = 32, 2, 2
        args.out = os.path.join(tempfile.gettempdir(), "drt_step_time_quick")
    cores = os.cpu_count() or 1
    threads = [int(t) for t in args.threads.split(",")] if args.threads else [t for t in (1, 2, 4, 8) if t <= cores]

    shapes = [_measure_shape(name, shape, args, threads) for name, shape in _shapes(args).items()]
    result = {
        "command": command("step_time.py"),
        "machine": machine(),
        "setup": {
            "batch": args.batch,
            "seq": args.seq,
            "density": args.density,
            "threads": threads,
            "steps_timed": args.rounds * args.steps,
        },
        "shapes": shapes,
        "targets": _check_targets(shapes),
    }
    write_report(args.out, result, _markdown)


def _check_targets(shapes: list[dict]) -> list[dict]:
    """Each target of :data:`TARGETS`, per shape and thread count: the median per-round ratio and whether it holds."""
    checks = []
    for method, against, only, bound in TARGETS:
        for shape in shapes:
            if only is not None and shape["shape"] != only:
                continue
            row = next(r for r in shape["rows"] if r["method"] == method)
            for count, timing in row["threads"].items():
                ratio = timing[f"vs_{against.lower()}"]["median"]
                checks.append(
                    {
                        "target": f"{method} ≤ {bound}× {against}",
                        "shape": shape["shape"],
                        "threads": int(count),
                        "ratio": ratio,
                        "met": ratio <= bound,
                    }
                )
    return checks


def _markdown(result: dict) -> str:
    s = result["setup"]
    m = result["machine"]
    lines = [
        f"BERT classifiers from config, batch {s['batch']} × {s['seq']}; all encoder linear layers targeted, "
        f"density {s['density']}; LoRA/SHiRA at the rank with d's parameter count. Per shape and thread count all "
        f"methods ran interleaved in one process, {s['steps_timed']} AdamW steps each; step time median (quartiles), "
        f"ratios as median [range] of the per-round ratios. {m['cores']} cores, torch {m['torch']}. "
        f"Command: `{result['command']}`.",
        "",
    ]
    for shape in result["shapes"]:
        lines += [
            f"**{shape['shape']}** (hidden {shape['hidden']}, {shape['layers']} layers): d = {shape['d']:,} of "
            f"D = {shape['D']:,}, rank {shape['rank']}.",
            "",
            "| method | threads | step (s) | vs full | vs LoRA | trainable | optimizer state (B) | adapter (B) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in shape["rows"]:
            adapter = f"{row['adapter_bytes']:,}" if row["adapter_bytes"] is not None else "—"
            for count, t in row["threads"].items():
                lines.append(
                    f"| {row['method']} | {count} | {t['median_s']:.3f} ({t['q1_s']:.3f}–{t['q3_s']:.3f}) "
                    f"| {_ratio(t['vs_full'])} | {_ratio(t['vs_lora'])} | {row['trainable']:,} "
                    f"| {row['optimizer_state_bytes']:,} | {adapter} |"
                )
        kernels = {", ".join(r["weight_gradient_kernels"]) for r in shape["rows"] if r["weight_gradient_kernels"]}
        lines += ["", f"DRT weight-gradient kernel: {'; '.join(sorted(kernels))}.", ""]
    lines += ["Targets (median per-round ratio):", ""]
    for check in result["targets"]:
        verdict = "met" if check["met"] else "missed"
        lines.append(
            f"- {check['target']}, {check['shape']}, {check['threads']} thread(s): {check['ratio']:.2f} ({verdict})"
        )
    lines += [
        "",
        f"DRT optimizer state is 8·d bytes; adapters hold 4·d bytes of values, the seed, a small header and "
        f"{PROBE_BYTES_PER_LAYER} B per layer of base probe.",
        "",
    ]
    return "\n".join(lines)


def _ratio(r: dict[str, float]) -> str:
    return f"{r['median']:.2f} [{r['min']:.2f}–{r['max']:.2f}]"


if __name__ == "__main__":
    main()
