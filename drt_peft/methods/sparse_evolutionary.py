"""SET (Mocanu et al. 2018): drop the weights closest to zero from either side, regrow as many at random."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import Paper, register_method
from ..masks.dynamic import closest_to_zero_by_sign, drop_weights
from .drop_and_grow import DropAndGrow, DynamicConfig

if TYPE_CHECKING:
    from torch import Tensor

    from ..model import DRTModel


class SETPolicy(DropAndGrow):
    """SET's drop: per layer the ζ fraction of the smallest positive and of the largest negative weights."""

    def drop(self, model: DRTModel, step: int) -> list[Tensor]:
        """Per layer, the ``drop_fraction`` ζ of its positive trained weights that are smallest and ζ of its
        negative ones that are largest (Mocanu et al. 2018, Algorithm 1): the weights closest to zero from
        either side, each side counted on its own (:func:`~drt_peft.masks.dynamic.closest_to_zero_by_sign`).
        The weight is ϑ, in freeze mode the pretrained value plus what training added (ϑ − Θ(0) with
        ``drop_criterion="change"``)."""
        fraction = self.config.drop_fraction_at(step)
        return [
            closest_to_zero_by_sign(drop_weights(layer, self.config.drop_criterion), fraction)
            for _, layer in model.drt_layers()
        ]


@register_method("set")
@dataclass(frozen=True)
class SETConfig(DynamicConfig):
    """Sparse Evolutionary Training: a random ERK mask to start; every ``update_frequency`` steps each
    layer drops the ``drop_fraction`` ζ of its smallest positive trained weights and ζ of its largest
    negative ones (the weights closest to zero from either side, as in the paper) and regrows as
    many at untrained positions drawn at random from ``(seed, step, layer)``, the same on every
    process. Call ``model.update_masks(step, optimizer)`` after each optimizer step, or train with
    the Trainer and :class:`drt_peft.DRTCallback`.

    Example::

        config = SETConfig(density=0.05, update_frequency=100, drop_fraction=0.3, mode="prune")
        model = get_drt_model(base_model, config)
    """

    paper = Paper(
        "Mocanu, Mocanu, Stone, Nguyen, Gibescu & Liotta",
        "Scalable training of artificial neural networks with adaptive sparse connectivity inspired by network science",
        "Nature Communications",
        2018,
    )

    policy = SETPolicy
