"""``drt-peft inspect``: describe an adapter folder or Hub repo without loading a model.

Prints the method and its fields, the base model and its fingerprint, and a table of the layers
(shape, D, d, density, how ψ is stored, bytes); ``--json`` prints the same for scripts, and
``--plot FILE.png`` draws the density per layer and the mask of one layer (needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import math
import textwrap

import numpy as np

from ..checkpoint.summary import AdapterSummary, LayerSummary, summarize_adapter

#: Largest mask picture drawn, in blocks per side: a bigger weight is shown as the density of each block.
MASK_PIXELS = 256


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="an adapter folder or a Hub repo id")
    parser.add_argument("--json", action="store_true", help="print a JSON description instead of the table")
    parser.add_argument("--plot", metavar="FILE.png", help="draw the density per layer and one layer's mask")
    parser.add_argument(
        "--layer",
        default=None,
        help="the layer whose mask --plot draws: its number or name (default: the first layer whose mask is stored)",
    )
    parser.add_argument("--revision", default=None, help="revision of a Hub repo")


def _size(n: int) -> str:
    if n < 1024:
        return f"{n:,} B"
    return f"{n / 1024:,.1f} KiB" if n < 1024**2 else f"{n / 1024**2:,.1f} MiB"


def _percent(value: float | None) -> str:
    return f"{value:.2%}" if value is not None else "—"


def _row(layer: LayerSummary) -> list[str]:
    shape = "×".join(str(n) for n in layer.shape) if layer.shape is not None else "—"
    numel = f"{layer.numel:,}" if layer.numel is not None else "—"
    return [
        str(layer.index),
        layer.name or "—",
        shape,
        numel,
        f"{layer.d:,}",
        _percent(layer.density),
        layer.encoding,
        f"{layer.bytes:,}",
    ]


def format_table(summary: AdapterSummary) -> str:
    """The text ``drt-peft inspect`` prints."""
    base = summary.base
    lines = [
        f"adapter      {summary.file} ({_size(summary.file_bytes)})",
        f"method       {summary.method}" + (f" — {summary.paper}" if summary.paper else ""),
        f"base model   {base['name_or_path'] or '— (not recorded)'}"
        + (f" @ {base['revision']}" if base["revision"] else ""),
        f"fingerprint  {base['fingerprint'] or '—'}",
    ]
    numel = summary.numel
    total = f"{summary.d:,} of D = {numel:,} ({_percent(summary.d / numel)})" if numel else f"{summary.d:,}"
    lines.append(f"trained      d = {total} in {len(summary.layers)} layers")
    if summary.bias_bytes or summary.modules_to_save_bytes:
        lines.append(
            f"             and in full: biases {_size(summary.bias_bytes)}, modules_to_save "
            f"{_size(summary.modules_to_save_bytes)}"
        )
    skip = {"base_model_name_or_path", "revision", "base_model_fingerprint"}
    fields = {key: value for key, value in sorted(summary.config.items()) if key not in skip}
    text = ", ".join(f"{key}={json.dumps(value)}" for key, value in fields.items())
    lines += textwrap.wrap(text, 110, initial_indent="fields       ", subsequent_indent=" " * 13)
    header = ["#", "layer", "shape", "D", "d", "density", "ψ", "bytes"]
    rows = [header, *(_row(layer) for layer in summary.layers)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    left = {1, 2, 6}
    lines.append("")
    for row in rows:
        cells = [
            cell.ljust(w) if i in left else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    if all(layer.name is None for layer in summary.layers) and summary.layers:
        lines.append("(saved before layer names and shapes were recorded: layers are numbered)")
    return "\n".join(lines)


def _pick_layer(summary: AdapterSummary, layer: str | None) -> int | None:
    """The index of the layer ``--layer`` names, or the first layer with a stored mask and d > 0."""
    if layer is None:
        candidates = [entry.index for entry in summary.layers if entry.index_bytes and entry.d]
        return candidates[0] if candidates else (0 if summary.layers else None)
    if layer.isdigit() and int(layer) < len(summary.layers):
        return int(layer)
    for entry in summary.layers:
        if entry.name == layer:
            return entry.index
    names = [entry.name for entry in summary.layers if entry.name]
    raise ValueError(
        f"--layer {layer!r} is neither a layer number below {len(summary.layers)} nor a layer name"
        + (f" (e.g. {names[0]!r})" if names else "")
    )


def block_density(mask: np.ndarray, pixels: int = MASK_PIXELS) -> np.ndarray:
    """``mask`` as a 2-D picture of at most ``pixels`` × ``pixels``: the fraction of trained entries per block
    (NaN, drawn blank, where a block holds no entry).

    A weight of more than two dimensions is drawn as (outputs, the rest); a flat mask as a near-square.
    """
    if mask.ndim >= 2:
        grid = mask.reshape(mask.shape[0], -1)
    else:
        width = max(1, math.ceil(math.sqrt(mask.size)))
        grid = np.zeros(width * math.ceil(mask.size / width), dtype=bool)
        grid[: mask.size] = mask
        grid = grid.reshape(-1, width)
    entries = np.zeros(grid.shape, dtype=bool)
    entries.reshape(-1)[: mask.size] = True
    fr, fc = math.ceil(grid.shape[0] / pixels), math.ceil(grid.shape[1] / pixels)
    rows, cols = math.ceil(grid.shape[0] / fr), math.ceil(grid.shape[1] / fc)

    def per_block(values: np.ndarray) -> np.ndarray:
        padded = np.zeros((rows * fr, cols * fc), dtype=np.float64)
        padded[: values.shape[0], : values.shape[1]] = values
        return padded.reshape(rows, fr, cols, fc).sum(axis=(1, 3))

    counts = per_block(entries)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, per_block(grid) / counts, np.nan)


def _unstored(encoding: str) -> str:
    if encoding == "seed":
        return "ψ is drawn from the seed, not stored; DRTModel.from_pretrained(base, adapter).get_masks() rebuilds it"
    return "this method's layers have no ψ" if encoding == "none" else "ψ is not stored in the file"


def plot(summary: AdapterSummary, file: str, layer: int | None) -> None:
    """Draw the density per layer and the mask of ``layer`` into ``file``."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "--plot needs matplotlib, which is not installed: pip install matplotlib (or the 'bench' extra, "
            "pip install 'drt-peft[bench]')"
        ) from None
    figure = Figure(figsize=(10, 7.5), layout="constrained")
    bars, picture = figure.subplots(2, 1, height_ratios=(1, 1.6))
    densities = [entry.density or 0.0 for entry in summary.layers]
    container = bars.bar(range(len(densities)), [100 * value for value in densities], color="tab:blue")
    bars.set_xlabel("layer")
    bars.set_ylabel("density d/D (%)")
    bars.set_title(f"{summary.method}: density per layer")
    if layer is not None:
        container.patches[layer].set_color("tab:orange")
    entry = summary.layers[layer] if layer is not None else None
    mask = summary.mask(layer) if layer is not None else None
    if mask is None:
        picture.axis("off")
        why = "the adapter has no layers" if entry is None else _unstored(entry.encoding)
        picture.text(0.5, 0.5, f"no mask to draw ({why})", ha="center", va="center")
    else:
        image = picture.imshow(
            block_density(mask), cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest"
        )
        figure.colorbar(image, ax=picture, label="fraction trained")
        shape = "×".join(str(n) for n in mask.shape)
        picture.set_title(f"mask of layer {entry.index} {entry.name or ''} ({shape}, d = {entry.d:,})")
        picture.set_xlabel("input" if mask.ndim >= 2 else "entry")
        picture.set_ylabel("output" if mask.ndim >= 2 else "")
    figure.savefig(file, dpi=100)


def run(args: argparse.Namespace) -> int:
    hub_kwargs = {"revision": args.revision} if args.revision else {}
    try:
        summary = summarize_adapter(args.adapter, **hub_kwargs)
        layer = _pick_layer(summary, args.layer)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}")
        return 1
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        print(format_table(summary))
    if args.plot:
        try:
            plot(summary, args.plot, layer)
        except ImportError as err:
            print(f"error: {err}")
            return 1
        if not args.json:
            print(f"\nwrote {args.plot}")
    return 0
