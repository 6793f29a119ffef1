"""Data-free criteria: random and magnitude (survey §3.4, §5)."""

from __future__ import annotations

import torch
from torch import Tensor

from ...seeding import generator
from ..scoring import Scoring, register_criterion


@register_criterion("random")
def random_scores(scoring: Scoring) -> list[Tensor]:
    """s ~ U(0, 1), drawn per layer from a CPU generator seeded by (seed, layer name)."""
    seed = scoring.config.seed
    return [torch.rand(t.weight.shape, generator=generator(seed, "scores", t.name)) for t in scoring.targets]


@register_criterion("magnitude")
def magnitude_scores(scoring: Scoring) -> list[Tensor]:
    """s = |Θ(0)|: the base (pretrained or seeded) magnitude."""
    return [t.weight.detach().abs().float() for t in scoring.targets]
