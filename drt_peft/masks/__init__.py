"""From a config to ψ: criterion scores → per-layer budget → structured, deterministic top-k."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .budgets import layer_counts, total_budget
from .criteria import Target, register_criterion, score
from .selection import nm_candidates, select_rows, select_unstructured

if TYPE_CHECKING:
    from ..config import DRTConfig

__all__ = ["Target", "compute_indices", "register_criterion"]


def compute_indices(
    targets: Sequence[Target], config: DRTConfig, calibration_data: Iterable[Any] | None = None
) -> list[Tensor]:
    """Sorted flat indices ψ_l (into each weight's own layout) of the trained entries of each target."""
    with torch.no_grad():
        scores = [
            t.op.to_matrix(s)
            for t, s in zip(targets, score(config.criterion, targets, config, calibration_data), strict=True)
        ]
    shapes = [tuple(t.weight.shape) for t in targets]
    nm = config.nm
    if nm is not None:
        n, m = nm
        candidates = [nm_candidates(s, n, m, t.name) for s, t in zip(scores, targets, strict=True)]
        if config.density is not None and config.density > n / m:
            raise ValueError(f"density={config.density} exceeds what structure={config.structure!r} allows ({n / m:g})")
        scores = [s.float().masked_fill(~c, float("-inf")) for s, c in zip(scores, candidates, strict=True)]
        caps = [int(c.sum()) for c in candidates]
    else:
        caps = [s.numel() for s in scores]
    total = total_budget(config.density, config.num_trainable, sum(s.numel() for s in scores))
    if total > sum(caps):
        raise ValueError(
            f"num_trainable={total} exceeds the {sum(caps)} entries that structure={config.structure!r} allows"
        )
    counts = layer_counts(config.budget, shapes, total, caps, config.density)
    select = select_rows if config.structure == "rows" else select_unstructured
    masks = select(scores, counts, total)
    return [torch.nonzero(t.op.from_matrix(mask).reshape(-1)).flatten() for t, mask in zip(targets, masks, strict=True)]
