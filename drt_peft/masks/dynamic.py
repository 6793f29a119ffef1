"""Drop-and-grow, the step every dynamic sparse training method shares (survey §6)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..layer import DRTLayer
from .selection import top_k_mask


def drop_and_grow(
    layer: DRTLayer, fraction: float, grow_scores: Tensor, optimizer: torch.optim.Optimizer | None
) -> int:
    """Drop the round(fraction·d) trained entries of smallest |ϑ| and grow as many untrained entries
    with the largest ``grow_scores`` (weight-shaped); d stays exact. Returns how many moved.

    Ties resolve to lower positions (deterministic on every process); a just-dropped entry may be
    grown again. Values and optimizer state of grown entries follow :meth:`DRTLayer.update_indices`.
    """
    d = layer.num_trainable
    k = round(fraction * d)
    if k == 0:
        return 0
    dropped = top_k_mask(-layer.drt_values.detach().abs(), k)
    kept = layer.drt_indices[~dropped]
    scores = grow_scores.detach().reshape(-1).to(device=kept.device, dtype=torch.float64, copy=True)
    scores[kept] = float("-inf")
    grown = torch.nonzero(top_k_mask(scores, k)).flatten()
    layer.update_indices(torch.sort(torch.cat([kept, grown])).values, optimizer)
    return k
