"""Supermask / edge-popup (Ramanujan et al. 2020): weights frozen at Θ(0), a trained score picks the kept ones."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..base_weights import WEIGHT_INITS
from ..config import DRTConfig, Paper, register_method, setting
from ..layer.supermask import SCORE_RANKINGS, VARIANTS, SupermaskLayer
from ..masks.criteria.basic import random_scores
from ..policy import Policy
from ..validation import check_choice

if TYPE_CHECKING:
    from torch import Tensor, nn

    from ..model import DRTModel


class SupermaskPolicy(Policy):
    """Supermask layers whose initial scores are drawn from ``(seed, layer name)``."""

    def build_layer(self, module: nn.Module, indices: Tensor) -> SupermaskLayer:
        config = self.config
        return SupermaskLayer(module, indices, config.variant, config.bias == "all", config.score_ranking)

    def on_attach(self, model: DRTModel, step: int = 0) -> None:
        """Draw each layer's initial scores from ``(seed, layer name)``; a layer keeps scores it already has."""
        for name, layer in model.drt_layers():
            layer.seed_scores(self.config.seed, name)


@register_method("supermask")
@dataclass(frozen=True)
class SupermaskConfig(DRTConfig):
    """Train a mask, not the weights: Θ = Θ(0) ⊙ m(s) with a trainable score s per weight.

    The weights stay at their seeded initialisation Θ(0) (``base_init="seeded"``, regenerated from
    ``seed``; ``"pretrained"`` searches a subnetwork of the base instead). The forward uses the
    mask m(s) of each layer's top-k scores, k = density·D per layer (``budget`` "uniform" or
    "erk"), and the backward is straight-through, ∂L/∂s = ∂L/∂W_eff ⊙ Θ(0) (Ramanujan et al.
    2020, *What's Hidden in a Randomly Weighted Neural Network?*). In the survey's embedding (§2.2,
    eq. 7) ψ is the mask, ϑ = Θ(0)[ψ] is never trained, and χ·Θ(0) is zero (prune mode); see
    docs/methods/supermask.md.

    ``variant``: ``"top_k"`` (edge-popup; ranking |s| as the reference code does, or s with
    ``score_ranking="value"``); ``"signed"`` keeps the top-k of |s| and multiplies the
    kept weights by sign(s), so a weight can be kept, hidden or inverted (Koster et al. 2022,
    *Signing the Supermask: Keep, Hide, Invert*); ``"bernoulli"`` samples m ~ Bernoulli(sigmoid(s))
    in training (seeded draws, straight-through to sigmoid(s)) and uses the deterministic mask
    sigmoid(s) > 0.5 in evaluation (Zhou et al. 2019, *Deconstructing Lottery Tickets*). Its d is
    not fixed: ``density`` is only the initial keep probability, and ``model.drt_statistics()``
    reports the realised density.

    Costs: the scores are D-sized and they are what trains, so the optimizer state is D-sized by
    nature, and each training step forms a dense weight gradient. ``num_trainable`` of a layer
    (and the model card, ``drt_statistics``) reports d, the kept weights. The checkpoint is the
    seed plus the mask (ψ in its smallest encoding; ``"signed"`` adds 1 bit per kept weight) and
    holds no weight values. The scores are not saved with the adapter: loading gives the trained
    model's mask, and resuming score training needs a Trainer checkpoint (its state dict holds them).

    ``weight_init="signed_constant"`` draws Θ(0) as the paper's best initialisation, the "signed
    Kaiming constant" ±√2/√fan_in; the default ``"model"`` draws it as the model's own init.
    :meth:`as_in_paper` gives the paper's setting (top-k of |s| over signed-constant weights).

    Example::

        config = SupermaskConfig(density=0.5, variant="top_k", seed=0, modules_to_save=["classifier"])
        config = SupermaskConfig.as_in_paper(density=0.5, modules_to_save=["classifier"])  # Θ(0) = ±σ
        model = get_drt_model(base_model, config)       # Θ(0) re-drawn from the seed, scores trainable
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
        # ... train ..., then model.save_pretrained("supermask")  # seed + mask, no weight values
        model = DRTModel.from_pretrained(fresh_base_model, "supermask")
    """

    paper = Paper(
        "Ramanujan, Wortsman, Kembhavi, Farhadi & Rastegari",
        "What's Hidden in a Randomly Weighted Neural Network?",
        "CVPR",
        2020,
    )
    paper_setting = setting(variant="top_k", base_init="seeded", weight_init="signed_constant", score_ranking="abs")

    # Only fixes each layer's count k; the mask itself is the top-k of the scores.
    criterion = random_scores
    values_from_base = True
    honours_line_caps = False  # the mask follows the trained scores, without the row and column caps

    policy = SupermaskPolicy

    mode: str = field(
        default="prune",
        metadata={"help": "Must be 'prune': weights outside the mask are zero (Θ = Θ(0) ⊙ m)."},
    )
    base_init: str = field(
        default="seeded",
        metadata={
            "help": "Θ(0): 'seeded' (default) re-draws the targeted weights from `seed`, so the adapter needs no "
            "weight values; 'pretrained' searches a mask over the base model's own weights."
        },
    )
    variant: str = field(
        default="top_k",
        metadata={
            "help": "'top_k': keep the top-k scores (edge-popup); 'signed': keep the top-k |s| multiplied by sign(s) "
            "(keep, hide or invert); 'bernoulli': train with masks sampled from Bernoulli(sigmoid(s)), evaluate "
            "with sigmoid(s) > 0.5 (d not fixed; density is the initial keep probability)."
        },
    )

    score_ranking: str = field(
        default="abs",
        metadata={
            "help": "What variant 'top_k' ranks: 'abs' keeps the top-k |s|, as the reference code of Ramanujan et "
            "al. 2020 does (the straight-through gradient reaches s through |s|); 'value' keeps the top-k s. "
            "'signed' always ranks |s|; 'bernoulli' ranks nothing."
        },
    )
    weight_init: str = field(
        default="model",
        metadata={
            "help": "How base_init='seeded' draws Θ(0): 'model' as the model's own init; 'signed_constant' sets "
            "each weight to ±σ, σ = √2/√fan_in, with a random sign from `seed` (the signed Kaiming constant of "
            "Ramanujan et al. 2020, their best initialisation)."
        },
    )

    @property
    def seeded_weight_init(self) -> str:
        """``weight_init``: how ``base_init="seeded"`` draws this adapter's Θ(0)."""
        return self.weight_init

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("variant", self.variant, VARIANTS)
        check_choice("score_ranking", self.score_ranking, SCORE_RANKINGS)
        check_choice("weight_init", self.weight_init, WEIGHT_INITS)
        if self.score_ranking != "abs" and self.variant != "top_k":
            raise ValueError(
                f"score_ranking={self.score_ranking!r} applies to variant='top_k' only (got variant={self.variant!r}): "
                "'signed' ranks |s| and 'bernoulli' samples sigmoid(s); use score_ranking='abs'"
            )
        if self.weight_init != "model" and self.base_init != "seeded":
            raise ValueError(
                f"weight_init={self.weight_init!r} draws Θ(0) from the seed; use it with base_init='seeded' "
                f"(got base_init={self.base_init!r})"
            )
        self.allow_only(
            "weights outside the mask are zero, and each layer's mask is the top-k of its scores",
            mode="prune",
            budget=("uniform", "erk"),
            structure="unstructured",
        )
