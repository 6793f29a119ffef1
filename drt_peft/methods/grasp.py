"""GraSP (Wang et al. 2020) and its absolute variant (Lubana & Dick 2021): Hessian-gradient products."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..config import Paper, register_method, setting
from ..masks.criteria.gradient import grasp_abs_scores, grasp_scores
from .base import DataDrivenConfig


@dataclass(frozen=True)
class HessianGradientConfig(DataDrivenConfig):
    """The fields of the criteria built on H g: the temperature of the loss they differentiate."""

    temperature: float = field(
        default=200.0,
        metadata={
            "help": "T > 0: g and H g are taken of the loss of the logits divided by T, as the reference code of "
            "Wang et al. 2020 does (T = 200, also in Lubana & Dick 2021's code); 1.0 scores the plain loss. The "
            "model's own loss is recomputed from `logits / T` (cross-entropy, shifted for causal LMs); a `loss_fn` "
            "receives `temperature=T` and applies it itself."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0):
            raise ValueError(
                f"temperature={t!r} must be a finite number > 0 (the logits are divided by it; 1.0 scores the "
                "plain loss, 200.0 is Wang et al. 2020's)"
            )


@register_method("grasp")
@dataclass(frozen=True)
class GraSPConfig(HessianGradientConfig):
    """Gradient signal preservation: the paper removes the largest −θ ⊙ (H g), i.e. keeps the lowest.

    H g is a Hessian-vector product by double backprop over the targeted weights (transformers
    models switch to eager attention while scoring, as fused CPU attention has no double backward),
    of the loss of the logits divided by ``temperature`` (T = 200, as the reference code does).

    The defaults (``mode="freeze"``, ``budget="uniform"``) suit fine-tuning a pretrained model;
    :meth:`as_in_paper` gives the paper's setting: one global threshold, the rest pruned.

    Example::

        config = GraSPConfig(density=0.05, mode="prune", budget="global", num_batches=4)
        model = get_drt_model(base_model, config, calibration_data=train_batches)
        paper = GraSPConfig.as_in_paper(density=0.05)   # budget="global", mode="prune", temperature=200
    """

    paper = Paper(
        "Wang, Zhang & Grosse", "Picking Winning Tickets Before Training by Preserving Gradient Flow", "ICLR", 2020
    )
    paper_setting = setting(budget="global", mode="prune", temperature=200.0)

    criterion = grasp_scores


@register_method("grasp_abs")
@dataclass(frozen=True)
class GraSPAbsConfig(HessianGradientConfig):
    """|θ ⊙ (H g)|: keeps the weights whose removal changes the gradient flow most, in either direction.

    :meth:`as_in_paper` gives GraSP's pruning-at-initialisation setting (one global threshold, the
    rest pruned, T = 200) with this score; Lubana & Dick apply it to whole filters over rounds of
    pruning and training, which one selection does not reproduce (docs/methods/grasp.md).

    Example::

        config = GraSPAbsConfig(density=0.05, num_batches=4)
        model = get_drt_model(base_model, config, calibration_data=train_batches)
    """

    paper = Paper("Lubana & Dick", "A Gradient Flow Framework for Analyzing Network Pruning", "ICLR", 2021)
    paper_setting = setting(budget="global", mode="prune", temperature=200.0)

    criterion = grasp_abs_scores
