"""SET (Mocanu et al. 2018): drop the smallest weights, regrow as many at random."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Paper, register_method
from .drop_and_grow import DynamicConfig


@register_method("set")
@dataclass(frozen=True)
class SETConfig(DynamicConfig):
    """Sparse Evolutionary Training: a random ERK mask to start; every ``update_frequency`` steps each
    layer drops the ``drop_fraction`` of its trained entries with the smallest |ϑ| and regrows as
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
