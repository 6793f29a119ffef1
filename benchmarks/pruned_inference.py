"""End to end: MiniLM-L6 with its encoder's linear weights pruned and merged sparsely, against the dense model.

The real MiniLM-L6 classifier gets a magnitude mask in prune mode on each of its 36 encoder linear layers (query,
key, value, attention output, intermediate, output; every layer at the same density) at 90%, 95% and 99%
unstructured sparsity and 2:4. Each is merged twice: densely (``merge_and_unload()``, the speed of the unpruned
model) and with ``merge_and_unload(sparse=...)`` (``"auto"``; for 2:4 ``"condensed"``, since ``"auto"`` keeps
2:4 layers dense on CPU). With 1 and 2 CPU threads: latency at batch 1 and throughput at batch 64, sequences of
``--seq`` random tokens, the two models taking turns sample by sample; medians and quartiles. Also the largest
difference between their logits and the sizes of their files (``save_pretrained`` against
``save_sparse_model``). Writes JSON and a markdown table:

    python benchmarks/pruned_inference.py          # about 4 minutes on 2 cores
    python benchmarks/pruned_inference.py --quick  # a tiny BERT from a config, in seconds
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
from collections import Counter
from collections.abc import Callable

import torch
from _builders import ENCODER_LINEAR, MINILM, bert_classifier
from _report import (
    add_options,
    command,
    interleaved_ms,
    machine,
    pool_for_every_thread_count,
    quartiles,
    spread,
    write_report,
)
from torch import nn

from drt_peft import MagnitudeConfig, get_drt_model, save_sparse_model
from drt_peft.layer.sparse import SparseLinear

#: (name, density, structure, layout) of each pruned model.
MASKS = [
    ("90% unstructured", 0.1, "unstructured", "auto"),
    ("95% unstructured", 0.05, "unstructured", "auto"),
    ("99% unstructured", 0.01, "unstructured", "auto"),
    ("2:4", 0.5, "2:4", "condensed"),
]
#: The target: a 90%-pruned MiniLM at batch 1 against the dense one.
TARGET = ("90% unstructured", 1, 1.5)


def _forward(model: nn.Module, input_ids: torch.Tensor) -> Callable[[], torch.Tensor]:
    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return model(input_ids=input_ids).logits

    return forward


def _file_bytes(save: Callable[[str], None]) -> int:
    with tempfile.TemporaryDirectory() as folder:
        save(folder)
        return sum(entry.stat().st_size for entry in os.scandir(folder) if entry.name.endswith(".safetensors"))


def _pruned_models(args: argparse.Namespace, density: float, structure: str, layout: str) -> tuple[nn.Module, ...]:
    """The dense and the sparse merge of MiniLM (a tiny BERT for ``--quick``) with a magnitude mask."""
    config = MagnitudeConfig(density=density, structure=structure, mode="prune", target_modules=ENCODER_LINEAR)
    drt = get_drt_model(bert_classifier(args.quick, seed=0, vocab_size=100), config)  # the vocabulary: --quick
    dense = copy.deepcopy(drt).merge_and_unload().eval()
    return dense, drt.merge_and_unload(sparse=layout).eval()


def measure(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    g = torch.Generator().manual_seed(0)
    vocab = 100 if args.quick else 20000
    inputs = {batch: torch.randint(1, vocab, (batch, args.seq), generator=g) for batch in (1, 64)}
    rows, models = [], []
    for name, density, structure, layout in MASKS:
        dense, sparse = _pruned_models(args, density, structure, layout)
        layers = Counter(m.layout for m in sparse.modules() if isinstance(m, SparseLinear))
        difference = max(
            float((_forward(dense, x)() - _forward(sparse, x)()).abs().max()) for x in (inputs[1], inputs[64][:4])
        )
        models.append(
            {
                "mask": name,
                "layout": layout,
                "sparse_layers": dict(layers),
                "max_logit_difference": difference,
                "dense_file_bytes": _file_bytes(dense.save_pretrained),
                "sparse_file_bytes": _file_bytes(lambda folder, model=sparse: save_sparse_model(model, folder)),
            }
        )
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for batch, repeats, calls in ((1, args.repeats, 3), (64, max(3, args.repeats // 3), 1)):
                x = inputs[batch]
                times = interleaved_ms({"dense": _forward(dense, x), "sparse": _forward(sparse, x)}, repeats, calls)
                dense_ms, sparse_ms = quartiles(times["dense"]), quartiles(times["sparse"])
                rows.append(
                    {
                        "mask": name,
                        "layout": layout,
                        "threads": threads,
                        "batch": batch,
                        "dense_ms": dense_ms,
                        "sparse_ms": sparse_ms,
                        "speedup": round(dense_ms["median"] / sparse_ms["median"], 2),
                    }
                )
        done = ", ".join(
            f"{r['threads']} thr batch {r['batch']} {r['speedup']:.2f}×" for r in rows if r["mask"] == name
        )
        print(f"{name}: {done}", flush=True)
        del dense, sparse
    return rows, models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    pool_for_every_thread_count()
    parser.add_argument("--quick", action="store_true", help="a tiny BERT from a config (harness check)")
    add_options(parser, seq=64, repeats=12)
    parser.add_argument("--out", default="docs/benchmarks/pruned_inference")
    args = parser.parse_args()
    if args.quick:
        args.seq, args.repeats = 16, 2
        args.out = os.path.join(tempfile.gettempdir(), "drt_pruned_inference_quick")
    rows, models = measure(args)
    report = {
        "command": command("pruned_inference.py"),
        "machine": machine(),
        "setup": {"model": "tiny BERT from config" if args.quick else MINILM, "seq": args.seq},
        "models": models,
        "rows": rows,
    }
    write_report(args.out, report, _markdown)


def _markdown(report: dict) -> str:
    s, m = report["setup"], report["machine"]
    lines = [
        f"{s['model']}, encoder linear layers pruned by weight magnitude (prune mode), merged densely and with "
        f"`merge_and_unload(sparse=layout)`; sequences of {s['seq']} tokens; ms per forward, median (first–third "
        f"quartile) of interleaved samples; throughput = sequences / s. {m['cpu']}, {m['cores']} cores, torch "
        f"{m['torch']}. Command: `{report['command']}`.",
        "",
        "| mask | layout | threads | batch | dense ms | sparse ms | speedup | sparse sequences/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        throughput = 1e3 * r["batch"] / r["sparse_ms"]["median"]
        lines.append(
            f"| {r['mask']} | {r['layout']} | {r['threads']} | {r['batch']} | {spread(r['dense_ms'], 1)} "
            f"| {spread(r['sparse_ms'], 1)} | {r['speedup']:.2f}× | {throughput:,.1f} |"
        )
    lines += [
        "",
        "| mask | sparse layers | largest logit difference | dense file (bytes) | sparse file (bytes) | ratio |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in report["models"]:
        layers = ", ".join(f"{n} {layout}" for layout, n in sorted(r["sparse_layers"].items())) or "none"
        lines.append(
            f"| {r['mask']} | {layers} | {r['max_logit_difference']:.1e} | {r['dense_file_bytes']:,} "
            f"| {r['sparse_file_bytes']:,} | {r['sparse_file_bytes'] / r['dense_file_bytes']:.2f} |"
        )
    mask, batch, target = TARGET
    for threads in (1, 2):
        found = [
            r["speedup"] for r in report["rows"] if (r["mask"], r["batch"], r["threads"]) == (mask, batch, threads)
        ]
        verdict = "met" if found and min(found) >= target else "missed"
        lines.append(
            f"\n- Target, {threads} thread{'s' if threads > 1 else ''}: ≥ {target}× the dense model at "
            f"{mask}, batch {batch}: {', '.join(f'{v:.2f}×' for v in found)}, {verdict}."
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
