"""Drop-and-grow, the step every dynamic sparse training method shares (survey §6)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..layer import DRTLayer
from ..topk import top_k_mask
from .selection import capped_top_k, indices_of

#: What the drop rules judge a trained entry by (``DynamicConfig.drop_criterion``).
DROP_CRITERIA = ("magnitude", "change")


def drop_weights(layer: DRTLayer, criterion: str = "magnitude") -> Tensor:
    """The signed value each trained entry is judged by when dropping: its weight ϑ (``"magnitude"``, as
    the papers do), or ϑ − Θ(0), how far training moved it from the value it returns to when dropped
    (``"change"``, freeze mode only: a prune-mode layer keeps no Θ(0) at ψ)."""
    values = layer.drt_values.detach()
    if criterion == "magnitude":
        return values
    return values - layer.drt_base_values.to(values.dtype)


def smallest_magnitudes(layer: DRTLayer, k: int, criterion: str = "magnitude") -> Tensor:
    """Boolean mask over ψ of the ``k`` trained entries with the smallest |ϑ| (or |ϑ − Θ(0)|, see
    :func:`drop_weights`; ties: lower position)."""
    return top_k_mask(-drop_weights(layer, criterion).abs(), k)


def closest_to_zero_by_sign(weights: Tensor, fraction: float) -> Tensor:
    """Boolean mask over the 1-D ``weights`` of SET's drop (Mocanu et al. 2018, Algorithm 1): the
    ``fraction`` ζ of the positive weights that are smallest and the fraction ζ of the negative
    weights that are largest, i.e. the weights closest to zero from either side, each side counted
    and rounded on its own. A weight of exactly zero counts with the positive side, where it goes
    first; ties go to the lower position."""
    negative = weights < 0
    dropped = torch.zeros_like(negative)
    for side, closeness in ((negative, weights), (~negative, -weights)):
        dropped[side] = top_k_mask(closeness[side], round(fraction * int(side.sum())))
    return dropped


def regrow(
    layer: DRTLayer,
    dropped: Tensor,
    grow: int,
    grow_scores: Tensor,
    optimizer: torch.optim.Optimizer | None,
    *,
    keep_regrown: bool = False,
    caps: tuple[int, int] | None = None,
) -> None:
    """Drop the entries of ψ marked in ``dropped`` and grow ``grow`` untrained entries with the largest
    ``grow_scores`` (weight-shaped), with at most ``caps = (per_row, per_column)`` trained entries in any row and
    column of the layer's ``[out, fan_in]`` view afterwards, if given (:func:`~drt_peft.masks.budgets.line_caps`).

    Ties resolve to lower positions (deterministic on every process). A just-dropped entry may be
    grown again: by default it then starts afresh like any grown entry (value s·Θ(0) or 0, zero
    optimizer state), as in SET, SNFS and DSR, which grow among the weights the drop just set to
    zero; with ``keep_regrown`` it keeps its value and optimizer state, as in RigL (Evci et al.
    2020, whose update re-initialises only connections that were not active before it). Nothing to
    drop or grow leaves the layer untouched. A NaN score ranks below every other untrained entry, so
    exactly ``grow`` entries grow whatever the scores hold; likewise, entries the caps cannot place (a layer that
    grows more than its full lines leave room for) go to the best remaining ones, so d stays exact.
    """
    if grow == 0 and not bool(dropped.any()):
        return
    kept = layer.drt_indices[~dropped]
    scores = grow_scores.detach().reshape(-1).to(device=kept.device, dtype=torch.float64, copy=True)
    lowest = torch.finfo(scores.dtype).min  # a NaN score ranks last among the candidates, still above the kept
    torch.nan_to_num_(scores, nan=lowest, posinf=torch.finfo(scores.dtype).max, neginf=lowest)
    scores[kept] = float("-inf")
    grown = top_k_mask(scores, grow) if caps is None else _capped_growth(layer, kept, scores, grow, caps)
    indices = torch.sort(torch.cat([kept, indices_of(grown)])).values
    layer.update_indices(indices, optimizer, fresh=None if keep_regrown else ~torch.isin(indices, kept))


def _capped_growth(layer: DRTLayer, kept: Tensor, scores: Tensor, grow: int, caps: tuple[int, int]) -> Tensor:
    """Boolean over the flat weight of ``grow`` entries with the largest ``scores`` (-inf at ``kept``) that fit the
    lines' room ``caps`` leaves next to ``kept``; any the caps turn away go to the best entries left."""
    held = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    held[kept] = True
    shape = layer.weight_shape
    matrices = layer.op.to_matrix(scores.view(shape)), layer.op.to_matrix(held.view(shape))
    taken = capped_top_k([matrices[0]], grow, [caps], held=[matrices[1]])[0]
    grown = layer.op.from_matrix(taken.to(scores.device)).reshape(-1)
    short = grow - int(grown.sum())
    if short:
        grown |= top_k_mask(scores.masked_fill(grown, float("-inf")), short)
    return grown


def trained_values_finite(model: Any, step: int) -> bool:
    """Whether every layer's trained values ϑ are finite; if not, warn, naming the layers.

    A mask update ranks |ϑ| (and gradients): on NaN or inf it would move ψ at random and spread the
    damage, so the dynamic methods skip the update of such a step and try again at the next one.
    """
    bad = [name for name, layer in model.drt_layers() if not bool(torch.isfinite(layer.drt_values).all())]
    if bad:
        warnings.warn(
            f"step {step}: the trained values of {len(bad)} layer(s) are not finite (NaN or inf), e.g. {bad[:3]}; "
            "the mask update of this step is skipped (lower the learning rate or clip gradients)",
            stacklevel=3,
        )
    return not bad


def capture_dense_gradients(layers: Iterable[DRTLayer], enabled: bool) -> None:
    """Arm (or disarm) the dense weight-gradient capture of ``layers`` for the next backwards, clearing
    what was captured so far."""
    for layer in layers:
        layer.capture_dense_grad = enabled
        layer.dense_grad = None


def all_reduce_(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over all processes when running distributed, so every rank ranks the same scores."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor
