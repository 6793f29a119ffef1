"""Budgets (survey §3.2): how the total d is spread over the targeted layers.

- ``uniform``: every layer gets the same density: d_l = round(density·D_l) (at least 1), or
  ``num_trainable`` spread ∝ D_l;
- ``erk``: Erdős–Rényi-Kernel (Evci et al. 2020, after Mocanu et al. 2018): density_l ∝
  (Σ dims of W_l) / (Π dims of W_l), scaled so the total is d; layers that would exceed their
  capacity are capped and the rest rescaled;
- ``global``: no per-layer counts, one threshold over the scores of all layers (see selection).

Per-layer counts are integers summing exactly to d (largest-remainder rounding, ties to the
earlier layer), never above a layer's capacity.

Two controls act against a budget spent where the scores are loudest rather than where training
helps: ``score_normalisation="layer"`` puts every layer's scores on one scale before a global
ranking (:func:`normalise_layer`), and ``max_row_density`` / ``max_column_density`` cap how many
entries one output row or input column of a layer may hold (:func:`line_caps`; the selection
enforces them, :func:`~drt_peft.masks.selection.select_capped`), which lowers a layer's capacity
to :func:`capped_capacity`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor


def total_budget(density: float | None, num_trainable: int | None, capacity: int) -> int:
    """The total d from ``density`` or ``num_trainable``, for ``capacity`` selectable entries."""
    if num_trainable is not None:
        if num_trainable > capacity:
            raise ValueError(
                f"num_trainable={num_trainable} exceeds the {capacity} entries the targeted layers can train"
            )
        return num_trainable
    assert density is not None
    return max(1, min(capacity, round(density * capacity)))


def apportion(total: int, shares: Sequence[float], caps: Sequence[int]) -> list[int]:
    """Integers ``n_l <= caps[l]`` summing to ``total``, proportional to ``shares`` (largest remainder).

    Layers whose proportional share exceeds their cap are filled to the cap and the remainder
    is re-spread over the others.
    """
    if total > sum(caps):
        raise ValueError(f"cannot place {total} trained entries in layers holding {sum(caps)}")
    counts = [0] * len(shares)
    free = [i for i in range(len(shares)) if caps[i] > 0]
    remaining = total
    while True:
        weight = sum(shares[i] for i in free)
        if not free or weight <= 0:
            ideal = {i: caps[i] * remaining / max(1, sum(caps[j] for j in free)) for i in free}
        else:
            ideal = {i: shares[i] * remaining / weight for i in free}
        full = [i for i in free if ideal[i] >= caps[i]]
        if not full:
            break
        for i in full:
            counts[i] = caps[i]
            remaining -= caps[i]
        free = [i for i in free if i not in full]
    floors = {i: math.floor(ideal[i]) for i in free}
    for i in free:
        counts[i] = floors[i]
    leftover = remaining - sum(floors.values())
    by_remainder = sorted(free, key=lambda i: (-(ideal[i] - floors[i]), i))
    for i in by_remainder[:leftover]:
        counts[i] += 1
    return counts


def erk_shares(shapes: Sequence[Sequence[int]]) -> list[float]:
    """ERK density share of each weight shape, times its size: (Σ dims / Π dims) · D = Σ dims."""
    return [float(sum(shape)) for shape in shapes]


def layer_counts(
    budget: str, shapes: Sequence[Sequence[int]], total: int, caps: Sequence[int], density: float | None = None
) -> list[int] | None:
    """Per-layer d_l for ``budget`` (None for ``global``: the selection ranks all layers jointly).

    With ``budget="uniform"`` and a ``density``, each layer's count depends on its own size only,
    so adding or removing other targets does not change a layer's mask.
    """
    if budget == "global":
        return None
    sizes = [math.prod(shape) for shape in shapes]
    if budget == "uniform" and density is not None:
        counts = [max(1, round(density * size)) for size in sizes]
        for shape, count, cap in zip(shapes, counts, caps, strict=True):
            if count > cap:
                raise ValueError(
                    f"density={density} gives a layer of shape {tuple(shape)} {count} trained entries, more than the "
                    f"{cap} its structure and max_row_density / max_column_density allow; raise the caps or lower "
                    "the density"
                )
        return counts
    if budget == "uniform":
        return apportion(total, sizes, caps)
    if budget == "erk":
        return apportion(total, erk_shares(shapes), caps)
    raise ValueError(f"budget={budget!r} is not supported; use 'global', 'uniform' or 'erk'")


def normalise_layer(scores: Tensor) -> Tensor:
    """A layer's scores divided by their mean absolute value (all-zero scores stay as they are).

    Every layer's scores then average 1 in magnitude, so one ranking over all layers
    (``budget="global"``) compares how far an entry stands out within its layer, not how loud the
    layer's gradients are: a layer next to a new head no longer takes most of d for that reason.
    The mean of |s| rather than a norm: for nonnegative saliencies it is SNIP's own normalisation
    s / Σ s (Lee et al. 2019) applied per layer and scaled by the layer's size, it does not
    depend on the layer's size, and a few outliers move it less than a root mean square. Within a
    layer the order is unchanged.
    """
    scale = float(scores.detach().double().abs().mean())
    return scores / scale if scale > 0 else scores


def line_caps(shape: Sequence[int], max_row_density: float | None, max_column_density: float | None) -> tuple[int, int]:
    """``(per_row, per_column)``: the most trained entries an output row and an input column of an ``[out, fan_in]``
    layer may hold, ⌊max_row_density·fan_in⌋ and ⌊max_column_density·out⌋ but at least one (a cap limits where a
    layer's entries go, it never shuts a layer out); the whole line where no cap is set."""
    out, fan_in = shape
    per_row = fan_in if max_row_density is None else max(1, math.floor(max_row_density * fan_in + 1e-9))
    per_column = out if max_column_density is None else max(1, math.floor(max_column_density * out + 1e-9))
    return per_row, per_column


def capped_capacity(shape: Sequence[int], per_row: int, per_column: int) -> int:
    """How many entries an ``[out, fan_in]`` layer can hold with at most ``per_row`` in a row and ``per_column`` in a
    column: min(out·per_row, fan_in·per_column), which the greedy capped selection always reaches (until no row
    with room meets a column with room, one side is full)."""
    out, fan_in = shape
    return min(out * per_row, fan_in * per_column)
