"""FISH mask (Sung et al. 2021): the Fisher information of each weight (empirical by default)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..config import Paper, register_method
from ..layer import DRTLayer
from ..layer.retaining import RetainingLayer
from ..masks import ScoringContext, select_masks
from ..masks.criteria.fisher import fisher_scores, live_fisher_scores
from ..masks.dynamic import trained_values_finite
from ..masks.selection import indices_of
from ..policy import Policy
from ..targeting import Target
from ..validation import check_choice, check_int
from .base import DataDrivenConfig

if TYPE_CHECKING:
    from torch import Tensor, nn

    from ..model import DRTModel

FISHER_LABELS = ("true", "predicted", "sampled", "expected")


class FISHPolicy(Policy):
    """With ``update_frequency``, re-compute the Fisher of the current Θ and re-select ψ during training."""

    config: FISHConfig

    @property
    def rescores_during_training(self) -> bool:
        return bool(self.config.update_frequency)

    @property
    def needs_optimizer(self) -> bool:
        return bool(self.config.update_frequency)

    def build_layer(self, module: nn.Module, indices: Tensor) -> DRTLayer:
        """With re-scoring in freeze mode a :class:`~drt_peft.layer.retaining.RetainingLayer`: the weights FISH
        stops training keep their trained values (Sung et al. 2021), and ``unload`` still restores Θ(0)."""
        if self.config.update_frequency and self.config.mode == "freeze":
            return RetainingLayer(module, indices, self.config.bias == "all")
        return super().build_layer(module, indices)

    def on_attach(self, model: DRTModel, step: int = 0) -> None:
        if self.config.update_frequency:
            model.expect_update_masks(self.config.update_frequency)

    def on_step(self, model: DRTModel, step: int, optimizer: Any) -> dict[str, float]:
        """Every ``update_frequency`` steps: the Fisher of the current Θ on the calibration data, a new ψ."""
        every = self.config.update_frequency
        if not every or step == 0 or step % every or not trained_values_finite(model, step):
            return {}
        if model.calibration_data is None:
            raise ValueError(
                f"FISH re-scoring at step {step} needs calibration data, and this model has none (it was loaded "
                "from a checkpoint); set model.calibration_data (and model.loss_fn) first"
            )
        named = list(model.drt_layers())
        targets = [Target(name, layer.base_layer, layer.op) for name, layer in named]
        select = functools.partial(select_masks, targets, self.config)
        scoring = ScoringContext(model, targets, self.config, model.calibration_data, model.loss_fn, select)
        masks = select(live_fisher_scores(scoring, [layer for _, layer in named]))
        moved = 0
        for (_, layer), mask in zip(named, masks, strict=True):
            indices = indices_of(mask)
            moved += int((~torch.isin(indices, layer.drt_indices)).sum())
            layer.update_indices(indices, optimizer)
        return {"drt/moved": float(moved)}


@register_method("fish")
@dataclass(frozen=True)
class FISHConfig(DataDrivenConfig):
    """Train the entries with the largest mean squared per-sample gradient of log p(y|x), y the true label or, with
    ``fisher_labels``, labels from the model's own p(y|x) (see :mod:`drt_peft.masks.criteria.fisher`).

    The fine-tuning standard is 0.5% of the weights (``density=0.005``) with one global top-k
    (the default budget here). With ``update_frequency`` the mask is re-computed during training
    from the dense gradients of the current weights on the same calibration data (kept on the
    model as ``model.calibration_data``); changing d per layer, this needs a single process. As in
    the paper, the weights it stops training keep their trained values in freeze mode (they become
    frozen there; in prune mode they return to zero). Each sample gets its own backward; only the
    running sum of squares is kept.

    Unlike the paper, which counts a new classifier head inside its 0.5% budget, ``density`` here
    counts the targeted weights only: ``modules_to_save`` train in full beside d.

    Example::

        config = FISHConfig(density=0.005, num_samples=1024, modules_to_save=["classifier"])
        model = get_drt_model(base_model, config, calibration_data=train_batches)
    """

    paper = Paper("Sung, Nair & Raffel", "Training Neural Networks with Fixed Sparse Masks", "NeurIPS", 2021)

    criterion = fisher_scores
    policy = FISHPolicy

    budget: str = field(default="global", metadata={"help": "As in DRTConfig; FISH ranks all layers jointly."})
    num_samples: int = field(
        default=1024, metadata={"help": "Number N of samples the Fisher averages over (one backward each)."}
    )
    fisher_labels: str = field(
        default="true",
        metadata={
            "help": "y in log p(y|x): 'true', the batches' labels (the empirical Fisher, the paper's experiments); "
            "'expected', every label weighted by p(y|x) (the Fisher itself, its code's 'expect'; one backward per "
            "label); 'sampled', y drawn from p(y|x) with the seed (one backward, for many labels or token "
            "outputs); 'predicted', the model's arg-max. All but 'true' need dict batches and outputs with .logits."
        },
    )
    update_frequency: int | None = field(
        default=None,
        metadata={
            "help": "Re-compute the Fisher on the calibration data and re-select ψ every this many steps "
            "(None: the mask stays fixed). Needs model.update_masks(step, optimizer) or DRTCallback."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("num_samples", self.num_samples)
        check_choice("fisher_labels", self.fisher_labels, FISHER_LABELS)
        check_int("update_frequency", self.update_frequency, optional=True)
