"""SNIP: connection sensitivity |g ⊙ θ| on calibration data (Lee et al. 2019; survey eq. 16)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Paper, register_method, setting
from ..masks.criteria.gradient import snip_scores
from .base import DataDrivenConfig


@register_method("snip")
@dataclass(frozen=True)
class SNIPConfig(DataDrivenConfig):
    """Train the entries with the largest |g ⊙ θ|, g the mean loss gradient over ``calibration_data``.

    The defaults (``mode="freeze"``, ``budget="uniform"``) suit fine-tuning a pretrained model;
    :meth:`as_in_paper` gives the paper's setting: one global threshold over all layers, the rest
    pruned, scores from a single mini-batch (Lee et al. 2019, Algorithm 1).

    Example::

        config = SNIPConfig(density=0.01, num_batches=8, modules_to_save=["classifier"])
        model = get_drt_model(base_model, config, calibration_data=train_batches)
        paper = SNIPConfig.as_in_paper(density=0.05)   # budget="global", mode="prune", num_batches=1
    """

    paper = Paper(
        "Lee, Ajanthan & Torr", "SNIP: Single-shot Network Pruning based on Connection Sensitivity", "ICLR", 2019
    )
    paper_setting = setting(budget="global", mode="prune", num_batches=1)

    criterion = snip_scores
