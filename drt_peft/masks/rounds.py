"""Iterative pruning (FORCE, SynFlow): score, keep the round's density, re-score the masked network."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..logging import progress_bar
from ..schedules import round_densities
from .calibration import target_density
from .scoring import ScoringContext


def schedule_densities(scoring: ScoringContext) -> list[float]:
    """Densities of rounds r = 1..k, from the structure's maximum m (1, or N/M for N:M) to the target d:
    exponential m·(d/m)^(r/k) or linear m − r(m − d)/k."""
    config = scoring.config
    start = config.nm[0] / config.nm[1] if config.nm else 1.0
    return round_densities(start, target_density(scoring), config.rounds, config.schedule)


def prune_in_rounds(scoring: ScoringContext, score_round: Callable[[list[Tensor]], list[Tensor]]) -> list[Tensor]:
    """Run :func:`schedule_densities`' rounds and return the last round's scores.

    Before each round the targeted weights are set to their values at entry times the previous
    round's mask; ``score_round(originals)`` then scores them, and the config's budget and
    structure keep that round's density. The weights are restored afterwards.
    """
    weights = [t.weight for t in scoring.targets]
    originals = [w.detach().clone() for w in weights]
    masks = [torch.ones_like(w, dtype=torch.bool) for w in weights]
    scores: list[Tensor] = []
    desc = f"{scoring.config.method_name} rounds"
    try:
        for density in progress_bar(schedule_densities(scoring), desc=desc, unit="round"):
            with torch.no_grad():
                for w, original, mask in zip(weights, originals, masks, strict=True):
                    w.copy_(original * mask)
            scores = score_round(originals)
            masks = scoring.select(scores, density)
    finally:
        with torch.no_grad():
            for w, original in zip(weights, originals, strict=True):
                w.copy_(original)
    return scores
