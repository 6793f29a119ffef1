"""GraSP (Wang et al. 2020) and its absolute variant (Lubana & Dick 2021): Hessian-gradient products."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Paper, register_method
from ..masks.criteria.gradient import grasp_abs_scores, grasp_scores
from .base import DataDrivenConfig


@register_method("grasp")
@dataclass(frozen=True)
class GraSPConfig(DataDrivenConfig):
    """Gradient signal preservation: the paper removes the largest −θ ⊙ (H g), i.e. keeps the lowest.

    H g is a Hessian-vector product by double backprop over the targeted weights (transformers
    models switch to eager attention while scoring, as fused CPU attention has no double backward).

    Example::

        config = GraSPConfig(density=0.05, mode="prune", budget="global", num_batches=4)
        model = get_drt_model(base_model, config, calibration_data=train_batches)
    """

    paper = Paper(
        "Wang, Zhang & Grosse", "Picking Winning Tickets Before Training by Preserving Gradient Flow", "ICLR", 2020
    )

    criterion = grasp_scores


@register_method("grasp_abs")
@dataclass(frozen=True)
class GraSPAbsConfig(DataDrivenConfig):
    """|θ ⊙ (H g)|: keeps the weights whose removal changes the gradient flow most, in either direction.

    Example::

        config = GraSPAbsConfig(density=0.05, num_batches=4)
        model = get_drt_model(base_model, config, calibration_data=train_batches)
    """

    paper = Paper("Lubana & Dick", "A Gradient Flow Framework for Analyzing Network Pruning", "ICLR", 2021)

    criterion = grasp_abs_scores
