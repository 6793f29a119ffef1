"""FORCE / iterative SNIP (de Jorge et al. 2021): SNIP re-scored on the masked network."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Paper, register_method, setting
from ..masks.criteria.gradient import force_scores
from .base import DataDrivenConfig, IterativeConfig


@register_method("force")
@dataclass(frozen=True)
class FORCEConfig(IterativeConfig, DataDrivenConfig):
    """Prune over ``rounds`` rounds to ``density``; each round scores |θ ⊙ g(θ ⊙ m)| on the network
    masked by the previous round (pruned weights may come back, as in FORCE).

    The defaults (``mode="freeze"``, ``budget="uniform"``) suit fine-tuning a pretrained model;
    :meth:`as_in_paper` gives the paper's setting: one global threshold per round, the rest pruned
    (de Jorge et al. 2021; rounds and schedule as the reference code's defaults, 10 exponential).

    Example::

        config = FORCEConfig(density=0.01, rounds=10, schedule="exponential", num_batches=4)
        model = get_drt_model(base_model, config, calibration_data=train_batches)
        paper = FORCEConfig.as_in_paper(density=0.01, rounds=60)   # budget="global", mode="prune"
    """

    paper = Paper(
        "de Jorge, Sanyal, Behl, Torr, Rogez & Dokania",
        "Progressive Skeletonization: Trimming More Fat from a Network at Initialization",
        "ICLR",
        2021,
    )
    paper_setting = setting(budget="global", mode="prune")

    criterion = force_scores
