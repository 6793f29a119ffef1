"""FORCE / iterative SNIP (de Jorge et al. 2021): SNIP re-scored on the masked network."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Paper, register_method
from ..masks.criteria.gradient import force_scores
from .base import DataDrivenConfig, IterativeConfig


@register_method("force")
@dataclass(frozen=True)
class FORCEConfig(IterativeConfig, DataDrivenConfig):
    """Prune over ``rounds`` rounds to ``density``; each round scores |θ ⊙ g(θ ⊙ m)| on the network
    masked by the previous round (pruned weights may come back, as in FORCE).

    Example::

        config = FORCEConfig(density=0.01, rounds=10, schedule="exponential", num_batches=4)
        model = get_drt_model(base_model, config, calibration_data=train_batches)
    """

    paper = Paper(
        "de Jorge, Sanyal, Behl, Torr, Rogez & Dokania",
        "Progressive Skeletonization: Trimming More Fat from a Network at Initialization",
        "ICLR",
        2021,
    )

    criterion = force_scores
