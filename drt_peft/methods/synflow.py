"""SynFlow (Tanaka et al. 2020): data-free iterative synaptic flow."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Paper, register_method, setting
from ..masks.criteria.synflow import synflow_scores
from .base import IterativeConfig


@register_method("synflow")
@dataclass(frozen=True)
class SynFlowConfig(IterativeConfig):
    """Prune by (∂R/∂θ) ⊙ θ on the positive-linear network, R = 1ᵀ f_|θ|(1), over 100 rounds by default.

    How norms, softmax and attention are treated is in :mod:`drt_peft.masks.criteria.synflow`.
    ``calibration_data``, if given, only sets the input shape.

    The defaults (``mode="freeze"``, ``budget="uniform"``) suit fine-tuning a pretrained model;
    :meth:`as_in_paper` gives the paper's setting: one global threshold, the rest pruned, 100
    rounds on the exponential schedule (Tanaka et al. 2020).

    Example::

        config = SynFlowConfig.as_in_paper(density=0.05)   # the same as below
        config = SynFlowConfig(density=0.05, mode="prune", budget="global", rounds=100, schedule="exponential")
        model = get_drt_model(vision_model, config)
    """

    paper = Paper(
        "Tanaka, Kunin, Yamins & Ganguli",
        "Pruning neural networks without any data by iteratively conserving synaptic flow",
        "NeurIPS",
        2020,
    )
    paper_setting = setting(budget="global", mode="prune", rounds=100, schedule="exponential")

    criterion = synflow_scores
    default_rounds = 100
