"""What a criterion sees: the targets, the model, the calibration data and the selection rule."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..targeting import Target

if TYPE_CHECKING:
    from ..config import DRTConfig

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


Criterion = Callable[[ScoringContext], list[Tensor]]

_CRITERIA: dict[str, Criterion] = {}


def register_criterion(name: str) -> Callable[[Criterion], Criterion]:
    """Decorator: register a score function ``fn(scoring) -> list of weight-shaped scores`` under ``name``.

    The largest scores are kept.
    """

    def wrap(fn: Criterion) -> Criterion:
        if name in _CRITERIA:
            raise ValueError(f"criterion {name!r} is already registered")
        _CRITERIA[name] = fn
        return fn

    return wrap


def score(name: str, scoring: ScoringContext) -> list[Tensor]:
    """Scores of every target under the criterion ``name``, checked for shape and NaNs."""
    if name not in _CRITERIA:
        raise ValueError(f"unknown criterion {name!r}; registered: {sorted(_CRITERIA)}")
    with torch.no_grad():
        scores = _CRITERIA[name](scoring)
    for target, s in zip(scoring.targets, scores, strict=True):
        if s.shape != target.weight.shape:
            raise RuntimeError(f"criterion {name!r} gave scores of shape {tuple(s.shape)} for {target.name}")
        if torch.isnan(s).any():
            raise ValueError(f"criterion {name!r} produced NaN scores for {target.name}")
    return scores
