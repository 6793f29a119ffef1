"""Lubana & Dick (2021): magnitude × gradient, |g| · θ²."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Paper, register_method
from ..masks.criteria.gradient import lubana_dick_scores
from .base import DataDrivenConfig


@register_method("lubana_dick")
@dataclass(frozen=True)
class LubanaDickConfig(DataDrivenConfig):
    """Train the entries with the largest |g| · θ², which preserves the loss's first-order decrease rate.

    Example::

        config = LubanaDickConfig(density=0.01, num_batches=8)
        model = get_drt_model(base_model, config, calibration_data=train_batches)
    """

    paper = Paper("Lubana & Dick", "A Gradient Flow Framework for Analyzing Network Pruning", "ICLR", 2021)

    criterion = lubana_dick_scores
