"""One DRT layer against a dense one across densities: training step and pruned inference, 1 and 2 threads.

A Linear 768 → 3072 (BERT-base's FFN) on 2,048 tokens. For each density and thread count:

- training (forward + backward to the input and the trained entries), dense ``nn.Linear`` vs the
  DRT layer in freeze mode (dense products, sampled weight gradient) and in prune mode (CSR
  products below ``CSR_MAX_DENSITY``, dense above);
- inference (forward under ``no_grad``), dense vs the pruned layer.

And the inference modules of pruned models (``merge_and_unload(sparse=...)``, drt_peft.layer.sparse) against
a dense ``nn.Linear`` holding the same pruned weight: latency at batch 1 and throughput at batch 64 (one
vector per row), at 90%, 95% and 99% unstructured sparsity and for 1:10 and 2:4 N:M masks (one or two of every
10 or 4 consecutive inputs), the two taking turns sample by sample; medians and quartiles.

And the gradient of the trained values alone (the weight gradient at the d positions) by each kernel on
CPU: the tiled SDDMM (``drt_peft.layer.cpu_kernels``), the dense product gathered at ψ, and PyTorch's
``sampled_addmm`` with the transposing copies it needs (the kernel before the tiled one), at 256 and 2,048
tokens, for the FFN's two shapes; its crossover is what ``ops.DENSE_GRADIENT_DENSITY`` is set from.

Writes JSON, markdown tables with the crossover densities and the target (≥ 3.5× a dense layer
at 90% sparsity, batch 1), and a PNG plot:

    python benchmarks/layer_kernels.py            # about 3 minutes on 2 cores
    python benchmarks/layer_kernels.py --quick    # a small layer, to check the harness
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from _report import command, interleaved_ms, pool_for_every_thread_count, quartiles, spread, write_report
from torch import nn

from drt_peft import DRTLayer
from drt_peft.layer.cpu_kernels import tiled_sddmm
from drt_peft.layer.layer import CSR_MAX_DENSITY
from drt_peft.layer.ops import DENSE_GRADIENT_DENSITY, _pattern_flat_indices, csr_pattern
from drt_peft.layer.sparse import sparse_modules

DENSITIES = [0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2]
#: The pruned weights of the inference comparison: (name, density of an unstructured mask or (n, m) of an N:M one,
#: layouts measured).
PRUNED = [
    ("90% unstructured", 0.1, ("csr",)),
    ("95% unstructured", 0.05, ("csr",)),
    ("99% unstructured", 0.01, ("csr",)),
    ("1:10 N:M", (1, 10), ("csr", "condensed")),
    ("2:4 N:M", (2, 4), ("csr", "condensed")),
]
#: Densities and token counts of the weight-gradient comparison.
GRADIENT_DENSITIES = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2]
GRADIENT_TOKENS = [256, 2048]
#: Rows per forward (batch 1: latency; batch 64: throughput) and the calls timed together per sample.
INFERENCE_BATCHES = {1: 20, 64: 4}
#: The target: a 90%-pruned layer at batch 1 against a dense one (SRigL's condensed layer reached 3.4×).
TARGET = ("90% unstructured", 1, 3.5)

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    return statistics.median(interleaved_ms({"fn": fn}, repeats)["fn"])


def _training_step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        x.grad = None
        layer(x).backward(grad)
        for p in layer.parameters():
            p.grad = None

    return step


def _inference(layer: nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    def forward() -> torch.Tensor:
        with torch.no_grad():
            return layer(x)

    return forward


def measure(fan_in: int, fan_out: int, tokens: int, threads: int, repeats: int) -> list[dict]:
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, fan_in, generator=g, requires_grad=True)
    grad = torch.randn(tokens, fan_out, generator=g)
    dense = nn.Linear(fan_in, fan_out)
    rows = []
    for density in DENSITIES:
        d = max(1, round(density * fan_in * fan_out))
        indices = torch.randperm(fan_in * fan_out, generator=g)[:d].sort().values
        freeze = DRTLayer(nn.Linear(fan_in, fan_out), indices, "freeze")
        prune = DRTLayer(nn.Linear(fan_in, fan_out), indices, "prune")
        rows.append(  # dense is re-measured beside every density, so drift on a shared machine cancels
            {
                "threads": threads,
                "density": density,
                "dense_train_ms": round(_median_ms(_training_step(dense, x, grad), repeats), 2),
                "freeze_train_ms": round(_median_ms(_training_step(freeze, x, grad), repeats), 2),
                "prune_train_ms": round(_median_ms(_training_step(prune, x, grad), repeats), 2),
                "prune_sparse_kernels": prune.sparse_kernels,
                "dense_infer_ms": round(_median_ms(_inference(dense, x), repeats), 2),
                "prune_infer_ms": round(_median_ms(_inference(prune, x), repeats), 2),
            }
        )
    return rows


def _pruned_indices(fan_out: int, fan_in: int, mask: float | tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """Sorted flat indices of the kept entries: ``mask`` of them at random, or ``n`` at random in every block of ``m``
    consecutive inputs of each output (the last block may be shorter), i.e. a constant fan-in."""
    if isinstance(mask, float):
        return torch.randperm(fan_out * fan_in, generator=g)[: max(1, round(mask * fan_out * fan_in))].sort().values
    n, m = mask
    blocks = -(-fan_in // m)
    scores = torch.rand(fan_out, blocks * m, generator=g)
    scores[:, fan_in:] = -1.0  # the padding of a short last block is never kept
    kept = scores.view(fan_out, blocks, m).topk(n, dim=-1).indices + m * torch.arange(blocks)[:, None]
    return (fan_in * torch.arange(fan_out)[:, None] + kept.reshape(fan_out, -1)).flatten().sort().values


def measure_pruned_inference(fan_in: int, fan_out: int, threads: int, repeats: int) -> list[dict]:
    """The inference modules against ``nn.Linear`` with the same pruned weight, interleaved (see module docstring)."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, mask, layouts in PRUNED:
        pruned = DRTLayer(nn.Linear(fan_in, fan_out), _pruned_indices(fan_out, fan_in, mask, g), "prune")
        dense = pruned.merge()
        for layout in layouts:
            module = sparse_modules([("layer", pruned)], layout)["layer"]
            for batch, calls in INFERENCE_BATCHES.items():
                x = torch.randn(batch, fan_in, generator=g)
                times = interleaved_ms({"dense": _inference(dense, x), "sparse": _inference(module, x)}, repeats, calls)
                dense_ms, sparse_ms = quartiles(times["dense"]), quartiles(times["sparse"])
                rows.append(
                    {
                        "threads": threads,
                        "mask": name,
                        "density": round(module.density, 4),
                        "layout": layout,
                        "batch": batch,
                        "dense_ms": dense_ms,
                        "sparse_ms": sparse_ms,
                        "speedup": round(dense_ms["median"] / sparse_ms["median"], 2),
                    }
                )
    return rows


def _gradient_kernels(pattern: torch.Tensor, gy: torch.Tensor, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The gradient of the values at ``pattern`` for dW = gyᵀ x, by each CPU kernel."""
    crow, col, flat = pattern.crow_indices(), pattern.col_indices(), _pattern_flat_indices(pattern)

    def sampled_addmm() -> torch.Tensor:  # row-major gyᵀ and column-major x: two transposing copies
        return torch.sparse.sampled_addmm(pattern, gy.t().contiguous(), x.t().contiguous().t(), beta=0.0).values()

    return {
        "tiled": lambda: tiled_sddmm(crow, col, gy, x),
        "dense": lambda: (gy.t() @ x).reshape(-1)[flat],
        "sampled_addmm": sampled_addmm,
    }


def measure_weight_gradient(shapes: list[tuple[int, int]], threads: int, repeats: int) -> list[dict]:
    """Each kernel for the values' gradient, interleaved, per shape, token count and density (module docstring)."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    rows = []
    for fan_in, fan_out in shapes:
        for tokens in GRADIENT_TOKENS:
            gy, x = torch.randn(tokens, fan_out, generator=g), torch.randn(tokens, fan_in, generator=g)
            for density in GRADIENT_DENSITIES:
                d = max(1, round(density * fan_in * fan_out))
                indices = torch.randperm(fan_in * fan_out, generator=g)[:d].sort().values
                times = interleaved_ms(
                    _gradient_kernels(csr_pattern(indices, (fan_out, fan_in), gy.dtype), gy, x), repeats
                )
                rows.append(
                    {
                        "threads": threads,
                        "shape": f"{fan_in} → {fan_out}",
                        "tokens": tokens,
                        "density": density,
                        **{f"{name}_ms": quartiles(values) for name, values in times.items()},
                    }
                )
    return rows


def crossover(rows: list[dict], sparse: str, dense: str) -> float | None:
    """The highest density up to which ``sparse`` is faster than ``dense`` at every density run (None if never)."""
    edge = None
    for row in sorted(rows, key=lambda r: r["density"]):
        if row[sparse] >= row[dense]:
            break
        edge = row["density"]
    return edge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    pool_for_every_thread_count()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", default="docs/benchmarks/layer_kernels")
    args = parser.parse_args()
    fan_in, fan_out, tokens = (768, 3072, 2048) if not args.quick else (64, 128, 64)
    if args.quick:
        args.repeats, args.out = 2, os.path.join(tempfile.gettempdir(), "drt_layer_kernels_quick")
    rows = [row for threads in (1, 2) for row in measure(fan_in, fan_out, tokens, threads, args.repeats)]
    inference = [row for threads in (1, 2) for row in measure_pruned_inference(fan_in, fan_out, threads, args.repeats)]
    shapes = [(fan_in, fan_out), (fan_out, fan_in)]
    gradient = [row for threads in (1, 2) for row in measure_weight_gradient(shapes, threads, args.repeats)]
    report = {
        "command": command("layer_kernels.py"),
        "machine": {
            "cpu": platform.machine(),
            "torch": torch.__version__,
            "csr_max_density": CSR_MAX_DENSITY,
            "dense_gradient_density": DENSE_GRADIENT_DENSITY,
        },
        "shape": {"fan_in": fan_in, "fan_out": fan_out, "tokens": tokens},
        "rows": rows,
        "pruned_inference": inference,
        "weight_gradient": gradient,
    }
    write_report(args.out, report, _markdown, _plot)


def _markdown(report: dict) -> str:
    s = report["shape"]
    lines = [
        f"Linear {s['fan_in']} → {s['fan_out']} on {s['tokens']} tokens, median of repeated runs (ms); "
        f"prune mode uses CSR kernels at densities ≤ {report['machine']['csr_max_density']}; torch "
        f"{report['machine']['torch']}. Command: `{report['command']}`.",
        "",
        "| threads | density | dense train | DRT freeze train | DRT prune train | dense inference | pruned inference |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['threads']} | {r['density']:g} | {r['dense_train_ms']:.1f} | {r['freeze_train_ms']:.1f} "
            f"| {r['prune_train_ms']:.1f} | {r['dense_infer_ms']:.1f} | {r['prune_infer_ms']:.1f} |"
        )
    lines.append("")
    for threads in (1, 2):
        rows = [r for r in report["rows"] if r["threads"] == threads]
        parts = []
        for key, what in (
            ("freeze_train_ms", "DRT freeze training"),
            ("prune_train_ms", "DRT prune training"),
            ("prune_infer_ms", "pruned inference"),
        ):
            dense = "dense_infer_ms" if "infer" in key else "dense_train_ms"
            edge = crossover(rows, key, dense)
            parts.append(f"{what} beats dense up to density {edge:g}" if edge else f"{what} never beats dense")
        lines.append(
            f"- {threads} thread{'s' if threads > 1 else ''}: " + "; ".join(parts) + " (of the densities run)."
        )
    return "\n".join(lines) + "\n\n" + _inference_markdown(report) + "\n" + _gradient_markdown(report)


def _gradient_markdown(report: dict) -> str:
    lines = [
        "Gradient of the trained values (the weight gradient at the d positions), ms per call, median (first–third "
        "quartile) of interleaved samples: the tiled SDDMM, the dense product gathered at ψ, and `sampled_addmm` "
        f"with its transposing copies. Layers denser than {report['machine']['dense_gradient_density']} "
        "(`DENSE_GRADIENT_DENSITY`) use the dense product.",
        "",
        "| threads | shape | tokens | density | tiled | dense + gather | sampled_addmm | tiled vs sampled_addmm |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["weight_gradient"]:
        lines.append(
            f"| {r['threads']} | {r['shape']} | {r['tokens']} | {r['density']:g} | {spread(r['tiled_ms'], 2)} "
            f"| {spread(r['dense_ms'], 2)} | {spread(r['sampled_addmm_ms'], 2)} "
            f"| {r['sampled_addmm_ms']['median'] / r['tiled_ms']['median']:.1f}× faster |"
        )
    lines.append("")
    groups = sorted({(r["threads"], r["shape"], r["tokens"]) for r in report["weight_gradient"]})
    for threads, shape, tokens in groups:
        rows = [
            {"density": r["density"], "tiled": r["tiled_ms"]["median"], "dense": r["dense_ms"]["median"]}
            for r in report["weight_gradient"]
            if (r["threads"], r["shape"], r["tokens"]) == (threads, shape, tokens)
        ]
        edge = crossover(rows, "tiled", "dense")
        verdict = f"up to density {edge:g}" if edge else "never"
        lines.append(
            f"- {threads} thread(s), {shape}, {tokens} tokens: the tiled SDDMM beats dense + gather {verdict}."
        )
    return "\n".join(lines) + "\n"


def _inference_markdown(report: dict) -> str:
    s = report["shape"]
    lines = [
        f"Inference modules of pruned models (`merge_and_unload(sparse=...)`) against `nn.Linear` with the same "
        f"pruned weight, Linear {s['fan_in']} → {s['fan_out']}: ms per forward, median (first–third quartile) of "
        f"interleaved samples; throughput = batch / time.",
        "",
        "| threads | mask | density | layout | batch | dense ms | sparse ms | speedup | sparse rows/s |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["pruned_inference"]:
        lines.append(
            f"| {r['threads']} | {r['mask']} | {r['density']:g} | {r['layout']} | {r['batch']} "
            f"| {spread(r['dense_ms'])} | {spread(r['sparse_ms'])} | {r['speedup']:.2f}× "
            f"| {1e3 * r['batch'] / r['sparse_ms']['median']:,.0f} |"
        )
    mask, batch, target = TARGET
    for threads in (1, 2):
        found = [
            r["speedup"]
            for r in report["pruned_inference"]
            if (r["threads"], r["mask"], r["batch"]) == (threads, mask, batch)
        ]
        verdict = "met" if found and min(found) >= target else "missed"
        lines.append(
            f"\n- Target, {threads} thread{'s' if threads > 1 else ''}: ≥ {target}× dense at {mask}, "
            f"batch {batch}: {', '.join(f'{v:.2f}×' for v in found)}, {verdict}."
        )
    return "\n".join(lines) + "\n"


def _plot(report: dict, plt: ModuleType) -> Figure:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    for ax, threads in zip(axes, (1, 2), strict=True):
        rows = [r for r in report["rows"] if r["threads"] == threads]
        densities = [r["density"] for r in rows]
        for key, label in (
            ("freeze_train_ms", "DRT freeze, train"),
            ("prune_train_ms", "DRT prune, train"),
            ("prune_infer_ms", "pruned, inference"),
        ):
            ax.plot(densities, [r[key] for r in rows], marker="o", label=label)
        ax.plot(densities, [r["dense_train_ms"] for r in rows], color="black", linestyle="--", label="dense, train")
        ax.plot(densities, [r["dense_infer_ms"] for r in rows], color="gray", linestyle=":", label="dense, inference")
        ax.set_xscale("log")
        ax.set_xlabel("density d/D")
        ax.set_ylabel("ms")
        ax.set_title(f"{threads} thread{'s' if threads > 1 else ''}")
    axes[0].legend(fontsize=8)
    return fig


if __name__ == "__main__":
    main()
