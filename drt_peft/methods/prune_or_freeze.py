"""Prune-or-freeze by direction (Zhou et al. 2019): untrained weights that moved toward zero are pruned."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..config import Paper, register_method
from ..layer.partly_pruned import PartlyPrunedLayer
from .lottery_ticket import LotteryPolicy, LotteryTicketConfig

if TYPE_CHECKING:
    from ..model import DRTModel


class PruneOrFreezePolicy(LotteryPolicy):
    """Layers that prune part of their frozen entries; each round prunes the dropped entries that moved toward
    zero."""

    def build_layer(self, module: nn.Module, indices: Tensor) -> PartlyPrunedLayer:
        return PartlyPrunedLayer(module, indices, self.config.bias == "all")

    def carry_over(self, model: DRTModel, indices: list[Tensor]) -> list[Tensor]:
        """The pruned set of each layer once ψ shrinks to ``indices``: the old one plus the dropped
        entries whose trained value moved toward zero."""
        pruned = []
        for (_, layer), kept in zip(model.drt_layers(), indices, strict=True):
            dropped = ~torch.isin(layer.drt_indices, kept.to(layer.drt_indices.device))
            toward_zero = layer.drt_values.detach().abs() < layer.drt_base_values.abs()
            pruned.append(torch.cat([layer.drt_pruned, layer.drt_indices[dropped & toward_zero]]).sort().values)
        return pruned

    def restore(self, model: DRTModel, carried: list[Tensor]) -> None:
        for (_, layer), pruned in zip(model.drt_layers(), carried, strict=True):
            layer.prune(pruned)


@register_method("prune_or_freeze")
@dataclass(frozen=True)
class PruneOrFreezeConfig(LotteryTicketConfig):
    """A lottery-ticket search whose dropped weights are pruned or frozen by the direction they moved.

    Zhou, Lan, Liu & Yosinski, *Deconstructing lottery tickets: zeros, signs, and the supermask*,
    NeurIPS 2019: when a round drops an entry from ψ, it is set to zero if its trained value moved
    toward zero (|ϑ| < |Θ(0)|) and frozen at Θ(0) otherwise; the kept entries restart from Θ(0)
    (or Θ(k)) and train, as in :class:`LotteryTicketConfig`. Run it with
    :func:`drt_peft.find_lottery_ticket`; it is one-shot by default (one dense run, then the ticket).

    Example::

        config = PruneOrFreezeConfig(density=0.2, target_modules="all-linear")
        ticket = find_lottery_ticket(model, config, train_fn=my_training, output_dir="pof")
    """

    paper = Paper(
        "Zhou, Lan, Liu & Yosinski", "Deconstructing Lottery Tickets: Zeros, Signs, and the Supermask", "NeurIPS", 2019
    )

    policy = PruneOrFreezePolicy

    mode: str = field(default="freeze", metadata={"help": "Must be 'freeze': the untrained entries not pruned stay."})
    one_shot: bool = field(default=True, metadata={"help": "Prune to `density` in one round after the dense run."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.allow_only("the entries that moved away from zero stay frozen at Θ(0)", mode="freeze")
