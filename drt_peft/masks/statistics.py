"""Where a mask puts its budget: how ψ spreads over layers, output rows and input columns.

A criterion that follows a loud gradient can spend d on a few layers, rows or input columns
(an untrained head's neighbour, an outlier channel); the updates of entries concentrated like
that add up in the output. These statistics make the concentration visible, computed from ψ in
O(d) per layer (no D-sized mask). For a random mask of density p on an ``out × fan_in`` weight, a
row holds about p·fan_in entries, the top 1% of rows hold about 1% of them, and a fraction
1 − (1 − p)^out of the columns is touched. ``max_row_density`` / ``max_column_density`` (the densest
row's and column's share trained) show what the config fields of the same names cap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

#: The fraction of a layer's rows whose share of the layer's entries :func:`concentration` reports.
TOP_ROWS = 0.01
#: Statistics :func:`mask_statistics` reports as their maximum over layers (the others: d-weighted means).
MAXIMA = ("max_row_density", "max_column_density")


def concentration(indices: Tensor, shape: tuple[int, int]) -> dict[str, float]:
    """How the trained entries ``indices`` (flat, into an ``[out, fan_in]`` weight) spread over its rows and columns.

    ``top_rows_share``: the share of the entries held by the 1% of rows (at least one) that hold most;
    ``rows_touched`` / ``columns_touched``: the fraction of rows / columns with at least one entry;
    ``max_row_density`` / ``max_column_density``: the fraction of its entries that the densest row / column trains.
    """
    rows, fan_in = shape
    d = indices.numel()
    if d == 0:
        return dict.fromkeys(("top_rows_share", "rows_touched", "columns_touched", *MAXIMA), 0.0)
    per_row = torch.bincount(torch.div(indices, fan_in, rounding_mode="floor"), minlength=rows)
    per_column = torch.bincount(indices % fan_in, minlength=fan_in)
    top = max(1, math.ceil(TOP_ROWS * rows))
    return {
        "top_rows_share": float(per_row.topk(top).values.sum()) / d,
        "rows_touched": float((per_row > 0).float().mean()),
        "columns_touched": float((per_column > 0).float().mean()),
        "max_row_density": int(per_row.max()) / fan_in,
        "max_column_density": int(per_column.max()) / rows,
    }


def mask_statistics(
    names: Sequence[str], indices: Sequence[Tensor], shapes: Sequence[tuple[int, int]], per_layer: bool = False
) -> dict[str, float]:
    """The concentration of a whole adapter: ``drt/largest_layer_share`` (the largest layer's share of d),
    averaged over layers weighted by their d, ``drt/top_rows_share``, ``drt/rows_touched``,
    ``drt/columns_touched``, and the largest over layers of ``drt/max_row_density`` and
    ``drt/max_column_density``; with ``per_layer``, each layer's as ``drt/<statistic>/<name>``."""
    counts = [idx.numel() for idx in indices]
    d = sum(counts)
    if d == 0:
        return {}
    layers = [concentration(idx, shape) for idx, shape in zip(indices, shapes, strict=True)]
    stats = {"drt/largest_layer_share": max(counts) / d}
    for key in layers[0]:
        values = [layer[key] for layer in layers]
        stats[f"drt/{key}"] = (
            max(values) if key in MAXIMA else sum(n * value for n, value in zip(counts, values, strict=True)) / d
        )
        if per_layer:
            stats.update({f"drt/{key}/{name}": layer[key] for name, layer in zip(names, layers, strict=True)})
    return stats
