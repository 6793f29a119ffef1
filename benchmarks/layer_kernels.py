"""One DRT layer against a dense one across densities: training step and pruned inference, 1 and 2 threads.

A Linear 768 → 3072 (BERT-base's FFN) on 2,048 tokens. For each density and thread count:

- training (forward + backward to the input and the trained entries), dense ``nn.Linear`` vs the
  DRT layer in freeze mode (dense products, sampled weight gradient) and in prune mode (CSR
  products below ``CSR_MAX_DENSITY``, dense above);
- inference (forward under ``no_grad``), dense vs the pruned layer.

Writes JSON, a markdown table with the crossover densities and a PNG plot:

    python benchmarks/layer_kernels.py            # about 3 minutes on 2 cores
    python benchmarks/layer_kernels.py --quick    # a small layer, to check the harness
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from _report import command, write_report
from torch import nn

from drt_peft import DRTLayer
from drt_peft.layer.layer import CSR_MAX_DENSITY

DENSITIES = [0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2]

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


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
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", default="docs/benchmarks/layer_kernels")
    args = parser.parse_args()
    fan_in, fan_out, tokens = (768, 3072, 2048) if not args.quick else (64, 128, 64)
    if args.quick:
        args.repeats, args.out = 2, os.path.join(tempfile.gettempdir(), "drt_layer_kernels_quick")
    rows = [row for threads in (1, 2) for row in measure(fan_in, fan_out, tokens, threads, args.repeats)]
    report = {
        "command": command("layer_kernels.py"),
        "machine": {"cpu": platform.machine(), "torch": torch.__version__, "csr_max_density": CSR_MAX_DENSITY},
        "shape": {"fan_in": fan_in, "fan_out": fan_out, "tokens": tokens},
        "rows": rows,
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
