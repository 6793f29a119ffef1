"""SNIP: connection sensitivity |g ⊙ θ| on calibration data (Lee et al. 2019; survey eq. 16)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Paper, register_method
from ..masks.criteria.gradient import snip_scores
from .base import DataDrivenConfig


@register_method("snip")
@dataclass(frozen=True)
class SNIPConfig(DataDrivenConfig):
    """Train the entries with the largest |g ⊙ θ|, g the mean loss gradient over ``calibration_data``.

    Example::

        config = SNIPConfig(density=0.01, num_batches=8, modules_to_save=["classifier"])
        model = get_drt_model(base_model, config, calibration_data=train_batches)
    """

    paper = Paper(
        "Lee, Ajanthan & Torr", "SNIP: Single-shot Network Pruning based on Connection Sensitivity", "ICLR", 2019
    )

    criterion = snip_scores
