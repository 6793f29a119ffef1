"""Data-free criteria: random and magnitude (survey §3.4, §5)."""

from __future__ import annotations

import torch
from torch import Tensor

from ...criterion import criterion
from ...seeding import generator
from ..scoring import ScoringContext


@criterion("random")
def random_scores(scoring: ScoringContext) -> list[Tensor]:
    """s ~ U(0, 1), drawn per layer from a CPU generator seeded by (seed, layer name)."""
    seed = scoring.config.seed
    return [torch.rand(t.weight.shape, generator=generator(seed, "scores", t.name)) for t in scoring.targets]


@criterion("magnitude")
def magnitude_scores(scoring: ScoringContext) -> list[Tensor]:
    """s = |Θ(0)|: the base (pretrained or seeded) magnitude."""
    return [t.weight.detach().abs().float() for t in scoring.targets]


def lamp(magnitudes: Tensor) -> Tensor:
    """LAMP scores (Lee et al. 2021, eq. 3) of one layer: w_u² / Σ_{v: |w_v| ≥ |w_u|} w_v².

    Comparable across layers, so one global threshold prunes each layer in proportion to how
    much of its own squared norm it would lose.
    """
    squares = magnitudes.double().reshape(-1) ** 2
    order = torch.argsort(squares, stable=True)
    tail = squares[order].flip(0).cumsum(0).flip(0)
    scores = torch.empty_like(squares)
    scores[order] = squares[order] / tail.clamp_min(torch.finfo(torch.float64).tiny)
    return scores.reshape(magnitudes.shape)


@criterion("lamp")
def lamp_scores(scoring: ScoringContext) -> list[Tensor]:
    """s = LAMP(|Θ(0)|): layer-adaptive magnitudes."""
    return [lamp(t.weight.detach().abs()) for t in scoring.targets]
