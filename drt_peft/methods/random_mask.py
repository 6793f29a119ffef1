"""Random selection: ψ drawn uniformly at random (survey §5.1; Liu et al. 2022 with ERK)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import DRTConfig, Paper, register_method
from ..masks.criteria.basic import random_scores


@register_method("random")
@dataclass(frozen=True)
class RandomConfig(DRTConfig):
    """Train a seeded random subset of the targeted weights.

    Scores are s ~ U(0, 1) per entry from a generator seeded by ``(seed, layer name)``, so ψ is a
    function of the seed and the layer shapes: checkpoints store no indices, only the seed.
    With ``budget="erk"`` this is the strong random baseline of Liu et al. (2022).

    Example::

        config = RandomConfig(density=0.01, target_modules="all-linear", modules_to_save=["classifier"])
        model = get_drt_model(base_model, config)
    """

    paper = Paper(
        "Liu, Chen, Chen, Shen, Mocanu, Wang & Pechenizkiy",
        "The Unreasonable Effectiveness of Random Pruning: Return of the Most Naive Baseline for Sparse Training",
        "ICLR",
        2022,
    )

    criterion = random_scores
    indices_from_seed = True
