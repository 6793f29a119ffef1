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
from .selection import indices_of


def smallest_magnitudes(layer: DRTLayer, k: int) -> Tensor:
    """Boolean mask over ψ of the ``k`` trained entries with the smallest |ϑ| (ties: lower position)."""
    return top_k_mask(-layer.drt_values.detach().abs(), k)


def regrow(
    layer: DRTLayer, dropped: Tensor, grow: int, grow_scores: Tensor, optimizer: torch.optim.Optimizer | None
) -> None:
    """Drop the entries of ψ marked in ``dropped`` and grow ``grow`` untrained entries with the largest
    ``grow_scores`` (weight-shaped).

    Ties resolve to lower positions (deterministic on every process). A just-dropped entry may be
    grown again and then starts afresh like any grown entry (value s·Θ(0) or 0, zero optimizer
    state), as in RigL. Nothing to drop or grow leaves the layer untouched.
    """
    if grow == 0 and not bool(dropped.any()):
        return
    kept = layer.drt_indices[~dropped]
    scores = grow_scores.detach().reshape(-1).to(device=kept.device, dtype=torch.float64, copy=True)
    scores[kept] = float("-inf")
    grown = indices_of(top_k_mask(scores, grow))
    indices = torch.sort(torch.cat([kept, grown])).values
    layer.update_indices(indices, optimizer, fresh=~torch.isin(indices, kept))


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
