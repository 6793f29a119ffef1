"""What a criterion sees: the targets, the model, the calibration data and the selection rule."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..criterion import Criterion
from ..targeting import Target

if TYPE_CHECKING:
    from ..config import DRTConfig

logger = logging.getLogger(__name__)

#: ``loss_fn(model, batch) -> scalar loss`` for models whose output carries no ``.loss``.
LossFn = Callable[[nn.Module, Any], Tensor]


@dataclass(frozen=True)
class ScoringContext:
    """Everything a criterion may use. ``select(scores, density)`` applies the config's budget and
    structure to weight-shaped scores and returns boolean masks (iterative criteria prune with it)."""

    model: nn.Module
    targets: list[Target]
    config: DRTConfig
    calibration_data: Iterable[Any] | None
    loss_fn: LossFn | None
    select: Callable[[list[Tensor], float | None], list[Tensor]]


def score(chosen: Criterion, scoring: ScoringContext) -> list[Tensor]:
    """Scores of every target under the criterion ``chosen``, checked for shape and NaNs."""
    logger.info("scoring %d targeted weights with criterion %r", len(scoring.targets), chosen.name)
    with torch.no_grad():
        scores = chosen(scoring)
    for target, s in zip(scoring.targets, scores, strict=True):
        if s.shape != target.weight.shape:
            raise RuntimeError(f"criterion {chosen.name!r} gave scores of shape {tuple(s.shape)} for {target.name}")
        if torch.isnan(s).any():
            raise ValueError(f"criterion {chosen.name!r} produced NaN scores for {target.name}")
    return scores
