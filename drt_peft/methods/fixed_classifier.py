"""Fixed classifier (Hoffer, Hubara & Soudry 2018): a seeded random orthogonal head, only a temperature trains."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..config import DRTConfig, Paper, register_method
from ..layer.fixed_classifier import FixedClassifierLayer
from ..policy import Policy

if TYPE_CHECKING:
    from torch import Tensor, nn

    from ..model import DRTModel


class FixedClassifierPolicy(Policy):
    """Heads replaced by α·W·x, W drawn from ``(seed, layer name)``."""

    def build_layer(self, module: nn.Module, indices: Tensor) -> FixedClassifierLayer:
        """A :class:`~drt_peft.layer.fixed_classifier.FixedClassifierLayer`; ``indices`` is empty (no ψ)."""
        return FixedClassifierLayer(module, self.config.bias == "all", self.config.temperature_init)

    def on_attach(self, model: DRTModel, step: int = 0) -> None:
        """Draw each head's W from ``(seed, layer name)``; a head keeps a W it already has."""
        for name, layer in model.drt_layers():
            layer.draw_fixed_weight(self.config.seed, name)


@register_method("fixed_classifier")
@dataclass(frozen=True)
class FixedClassifierConfig(DRTConfig):
    """Replace the classification head by y = α·W·x: W fixed, random and orthogonal; α trains.

    Hoffer, Hubara & Soudry, *Fix your classifier: the marginal value of training the last weight
    layer* (ICLR 2018): the final layer can be fixed up to a global scale constant with little or
    no loss of accuracy. Each targeted head gets W regenerated from ``(seed, layer name)`` — the
    sign-corrected QR factor of a Gaussian matrix, orthonormal rows when out ≤ in (W·Wᵀ = I),
    orthonormal columns otherwise (see :mod:`drt_peft.layer.fixed_classifier`) — and one
    trainable scalar temperature α, started at ``temperature_init``. W is never stored and never
    trains; the adapter holds α. ``bias="none"`` (default) drops the head's bias term, so the
    layer is exactly α·W·x; ``bias="all"`` adds the head's bias and trains it.

    ψ is empty (no entry of the head's weight trains), and ``density`` / ``num_trainable`` must
    stay unset. The rest of the network trains only if listed in ``modules_to_save``: e.g.
    ``modules_to_save=["vit"]`` trains a ViT backbone in full behind the fixed head. Name the head
    explicitly (``target_modules``, default ``["classifier"]``); ``"all-linear"`` leaves heads out
    and is refused. A head whose weight is tied to the input embeddings (GPT-2's ``lm_head``) is
    refused as for every method. ``merge_and_unload()`` writes α·W into the weight (and zeroes a
    dropped bias); ``unload()`` gives the original head back.

    Example::

        config = FixedClassifierConfig(target_modules=["classifier"], modules_to_save=["vit"], seed=0)
        model = get_drt_model(vit_from_scratch, config)   # the ViT trains, its head is α·W·x
    """

    paper = Paper(
        "Hoffer, Hubara & Soudry",
        "Fix your classifier: the marginal value of training the last weight layer",
        "ICLR",
        2018,
    )

    sized_by_density = False

    policy = FixedClassifierPolicy

    target_modules: list[str] | str | None = field(
        default_factory=lambda: ["classifier"],
        metadata={
            "help": "The classification head(s) to fix: module names or a regular expression (default "
            "['classifier']); 'all-linear' is refused, since it leaves heads out."
        },
    )
    temperature_init: float = field(
        default=1.0,
        metadata={"help": "Initial temperature α, the trained scale of the logits y = α·W·x; a finite number > 0."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_modules == "all-linear":
            raise ValueError(
                "target_modules='all-linear' is not supported by 'fixed_classifier'; name the head, e.g. "
                "['classifier'] ('all-linear' selects the backbone's layers and leaves heads out)"
            )
        self.allow_only(
            "the head's weight is replaced by a fixed orthogonal W regenerated from seed, and no entry of it trains",
            mode="freeze",
            base_init="pretrained",
            budget="uniform",
            structure="unstructured",
        )
        value = self.temperature_init
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise ValueError(
                f"temperature_init={value!r} is not allowed; use a finite number > 0 (the initial logit scale α)"
            )
