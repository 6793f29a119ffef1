"""Magnitude selection: ψ = the largest |Θ(0)| entries (survey §5.1)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import DRTConfig, Paper, register_method
from ..masks.criteria.basic import magnitude_scores


@register_method("magnitude")
@dataclass(frozen=True)
class MagnitudeConfig(DRTConfig):
    """Train the entries of largest base magnitude |Θ(0)|.

    In fine-tuning Θ(0) is the pretrained weight, so this trains the pretrained model's largest
    weights; at a random init it is close to random selection. Checkpoints store the indices,
    compactly encoded.

    Example::

        config = MagnitudeConfig(density=0.01, mode="prune", budget="global")
        model = get_drt_model(base_model, config)
    """

    paper = Paper(
        "Han, Pool, Tran & Dally",
        "Learning both Weights and Connections for Efficient Neural Networks",
        "NeurIPS",
        2015,
    )

    criterion = magnitude_scores
