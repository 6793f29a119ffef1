"""Intrinsic dimension (Li et al. 2018; Aghajanyan et al. 2021): Θ = Θ(0) + P·ϑ in a random subspace."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import DRTConfig, Paper, register_method
from ..layer.projected import ProjectedLayer, share_projection
from ..masks.budgets import total_budget
from ..policy import Policy

if TYPE_CHECKING:
    from torch import Tensor, nn

    from ..model import DRTModel


class IntrinsicDimensionPolicy(Policy):
    """Projected layers sharing one ϑ ∈ R^d through Fastfood transforms."""

    def build_layer(self, module: nn.Module, indices: Tensor) -> ProjectedLayer:
        """A :class:`~drt_peft.layer.projected.ProjectedLayer`; ``indices`` is empty (no ψ)."""
        return ProjectedLayer(module, self.config.bias == "all")

    def on_attach(self, model: DRTModel, step: int = 0) -> None:
        """Create ϑ ∈ R^d once all layers exist (d and P's scale depend on their total size D)."""
        layers = list(model.drt_layers())
        total = sum(layer.base_layer.weight.numel() for _, layer in layers)
        share_projection(layers, total_budget(self.config.density, self.config.num_trainable, total), self.config.seed)


@register_method("intrinsic_dimension")
@dataclass(frozen=True)
class IntrinsicDimensionConfig(DRTConfig):
    """Train one vector ϑ ∈ R^d for all targeted weights: Θ = Θ(0) + P·ϑ (Li et al. 2018, §2).

    Li, Farkhoor, Liu & Yosinski, *Measuring the Intrinsic Dimension of Objective Landscapes*
    (ICLR 2018), θ^(D) = θ_0^(D) + P θ^(d); Aghajanyan, Gupta & Zettlemoyer, *Intrinsic
    Dimensionality Explains the Effectiveness of Language Model Fine-Tuning* (ACL 2021) for
    fine-tuning. P ∈ R^(D×d) is a Fastfood transform regenerated from ``seed`` (see
    :mod:`drt_peft.layer.projected`) with columns of unit norm, so ‖Θ − Θ(0)‖ ≈ ‖ϑ‖. There is no
    ψ: the embedding selects no entries (``criterion`` is empty), P replaces it, and every entry
    of every targeted weight moves. d is ``num_trainable``, or round(density · D) with D the size
    of all targeted weights; ϑ starts at 0, so the model starts at Θ(0).

    The checkpoint holds ϑ (4·d bytes in float32) and the config with its seed. Only
    ``mode="freeze"`` (Θ(0) is kept), ``budget="uniform"`` and ``structure="unstructured"`` apply.

    Example::

        config = IntrinsicDimensionConfig(num_trainable=1000, modules_to_save=["classifier"])
        model = get_drt_model(base_model, config)
    """

    paper = Paper(
        "Li, Farkhoor, Liu & Yosinski", "Measuring the Intrinsic Dimension of Objective Landscapes", "ICLR", 2018
    )

    policy = IntrinsicDimensionPolicy

    def __post_init__(self) -> None:
        super().__post_init__()
        self.allow_only(
            "ϑ is one global vector added to Θ(0) through a dense projection, with no per-layer mask",
            mode="freeze",
            budget="uniform",
            structure="unstructured",
        )
