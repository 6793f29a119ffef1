"""From a config to ψ: criterion scores → per-layer budget → structured, deterministic top-k."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from ..criterion import Criterion, criterion
from ..targeting import Target
from .budgets import capped_capacity, layer_counts, line_caps, normalise_layer, total_budget
from .scoring import LossFn, ScoringContext, score
from .selection import indices_of, nm_candidates, select_capped, select_rows, select_unstructured
from .warmup import head_warmed_up

if TYPE_CHECKING:
    from ..config import DRTConfig

__all__ = ["Criterion", "LossFn", "ScoringContext", "compute_indices", "criterion", "select_masks"]


def select_masks(
    targets: list[Target], config: DRTConfig, scores: list[Tensor], density: float | None = None
) -> list[Tensor]:
    """Boolean masks (shaped like each weight) of the entries that ``config``'s budget and structure
    keep, at ``density`` (default: the config's ``density`` or ``num_trainable``), after its
    ``score_normalisation`` and under its ``max_row_density`` / ``max_column_density`` caps."""
    matrices = [t.op.to_matrix(s) for t, s in zip(targets, scores, strict=True)]
    if config.score_normalisation == "layer":
        matrices = [normalise_layer(s) for s in matrices]
    shapes = [tuple(t.weight.shape) for t in targets]
    if density is None:
        density, num_trainable = config.density, config.num_trainable
    else:
        num_trainable = None
    nm = config.nm
    if nm is not None:
        n, m = nm
        candidates = [nm_candidates(s, n, m, t.name) for s, t in zip(matrices, targets, strict=True)]
        if density is not None and density > n / m:
            raise ValueError(f"density={density} exceeds what structure={config.structure!r} allows ({n / m:g})")
        matrices = [s.masked_fill(~c, float("-inf")) for s, c in zip(matrices, candidates, strict=True)]
        caps = [int(c.sum()) for c in candidates]
    else:
        caps = [s.numel() for s in matrices]
    capped = config.max_row_density is not None or config.max_column_density is not None
    if capped:
        lines = [line_caps(s.shape, config.max_row_density, config.max_column_density) for s in matrices]
        caps = [min(cap, capped_capacity(s.shape, *line)) for cap, s, line in zip(caps, matrices, lines, strict=True)]
    total = total_budget(density, num_trainable, sum(s.numel() for s in matrices))
    if total > sum(caps):
        raise ValueError(
            f"d={total} trained entries exceed the {sum(caps)} that structure={config.structure!r}, "
            f"max_row_density={config.max_row_density} and max_column_density={config.max_column_density} allow"
        )
    counts = layer_counts(config.budget, shapes, total, caps, density)
    if capped:
        selected = select_capped(matrices, counts, total, lines)
    elif config.structure == "rows":
        selected = select_rows(matrices, counts, total)
    else:
        selected = select_unstructured(matrices, counts, total)
    return [t.op.from_matrix(m) for t, m in zip(targets, selected, strict=True)]


def compute_indices(
    model: nn.Module,
    targets: list[Target],
    config: DRTConfig,
    calibration_data: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
) -> list[Tensor]:
    """Sorted flat indices ψ_l (into each weight's own layout) of the trained entries of each target; scored after
    the config's head warm-up (:func:`~drt_peft.masks.warmup.head_warmed_up`), if it has one."""
    select = functools.partial(select_masks, targets, config)
    scoring = ScoringContext(model, targets, config, calibration_data, loss_fn, select)
    with head_warmed_up(scoring):
        scores = score(config.criterion, scoring)
    return [indices_of(mask) for mask in select(scores)]
