"""Criteria (survey §3.4): score functions whose largest scores select ψ.

A criterion maps the targeted layers to one score tensor per layer, shaped like its weight.
Register one with :func:`register_criterion`; a method config names it in ``criterion``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..layer import WeightOp
from ..seeding import generator

if TYPE_CHECKING:
    from ..config import DRTConfig


@dataclass(frozen=True)
class Target:
    """A targeted module: its name in the model, the module and its :class:`WeightOp`."""

    name: str
    module: nn.Module
    op: WeightOp

    @property
    def weight(self) -> Tensor:
        return self.module.weight


Criterion = Callable[[Sequence[Target], "DRTConfig", Iterable[Any] | None], list[Tensor]]

_CRITERIA: dict[str, Criterion] = {}


def register_criterion(name: str) -> Callable[[Criterion], Criterion]:
    """Decorator: register a score function under ``name``."""

    def wrap(fn: Criterion) -> Criterion:
        _CRITERIA[name] = fn
        return fn

    return wrap


def score(
    name: str, targets: Sequence[Target], config: DRTConfig, calibration_data: Iterable[Any] | None
) -> list[Tensor]:
    """Scores of every target under the criterion ``name``, checked for shape and NaNs."""
    if name not in _CRITERIA:
        raise ValueError(f"unknown criterion {name!r}; registered: {sorted(_CRITERIA)}")
    scores = _CRITERIA[name](targets, config, calibration_data)
    for target, s in zip(targets, scores, strict=True):
        if s.shape != target.weight.shape:
            raise RuntimeError(f"criterion {name!r} gave scores of shape {tuple(s.shape)} for {target.name}")
        if torch.isnan(s).any():
            raise ValueError(f"criterion {name!r} produced NaN scores for {target.name}")
    return scores


@register_criterion("random")
def random_scores(targets: Sequence[Target], config: DRTConfig, calibration_data: Iterable[Any] | None) -> list[Tensor]:
    """s ~ U(0, 1), drawn per layer from a CPU generator seeded by (seed, layer name)."""
    return [torch.rand(t.weight.shape, generator=generator(config.seed, "scores", t.name)) for t in targets]


@register_criterion("magnitude")
def magnitude_scores(
    targets: Sequence[Target], config: DRTConfig, calibration_data: Iterable[Any] | None
) -> list[Tensor]:
    """s = |Θ(0)|: the base (pretrained or seeded) magnitude."""
    return [t.weight.detach().abs().float() for t in targets]
