"""FreezeNet (Wimmer et al. 2021): SNIP-selected entries train, the rest stay frozen (not pruned)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from ..config import Paper, register_method, setting
from ..layer.frozen_decay import FrozenDecayLayer
from ..layer.layer import DRTLayer
from ..policy import Policy
from .snip import SNIPConfig

if TYPE_CHECKING:
    from ..model import DRTModel


class FreezeNetPolicy(Policy):
    """With ``frozen_weight_decay``, the frozen entries of every layer decay after each optimizer step."""

    config: FreezeNetConfig

    @property
    def needs_optimizer(self) -> bool:
        return bool(self.config.frozen_weight_decay)  # the decay per step is lr · frozen_weight_decay

    def build_layer(self, module: nn.Module, indices: Tensor) -> DRTLayer:
        """A :class:`~drt_peft.layer.frozen_decay.FrozenDecayLayer` when the frozen entries decay."""
        if not self.config.frozen_weight_decay:
            return super().build_layer(module, indices)
        return FrozenDecayLayer(module, indices, self.config.bias == "all")

    def on_step(self, model: DRTModel, step: int, optimizer: Any) -> dict[str, float]:
        if not self.config.frozen_weight_decay:
            return {}
        factor = 1.0 - optimizer.param_groups[0]["lr"] * self.config.frozen_weight_decay
        for _, layer in model.drt_layers():
            layer.decay_frozen(factor)
        return {"frozen_scale": next(layer for _, layer in model.drt_layers()).frozen_scale}


@register_method("freezenet")
@dataclass(frozen=True)
class FreezeNetConfig(SNIPConfig):
    """SNIP's ψ in freeze mode, with optional weight decay on the frozen part so the network ends sparse.

    The frozen entries of every layer share one scalar: after each optimizer step they are
    multiplied by (1 − lr · frozen_weight_decay), the decay AdamW would apply to them, with no
    D-sized optimizer state. Call ``model.update_masks(step, optimizer)`` once per step, or train
    with the Trainer and :class:`drt_peft.DRTCallback`.

    The paper freezes (the default here too) and keeps one global threshold over all layers;
    :meth:`as_in_paper` gives that (``budget="global"``), while the default ``"uniform"`` keeps the
    global ranking from spending the budget next to a new head.

    Example::

        config = FreezeNetConfig(density=0.01, frozen_weight_decay=0.01, num_batches=8)
        model = get_drt_model(base_model, config, calibration_data=train_batches)
    """

    paper = Paper("Wimmer, Mehnert & Condurache", "FreezeNet: Full Performance by Reduced Storage Costs", "ACCV", 2020)
    paper_setting = setting(budget="global", mode="freeze")

    policy = FreezeNetPolicy

    frozen_weight_decay: float = field(
        default=0.0,
        metadata={"help": "Weight decay λ on the frozen entries: each step they shrink by (1 − lr·λ); 0 keeps them."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.frozen_weight_decay, (int, float)) or self.frozen_weight_decay < 0:
            raise ValueError(f"frozen_weight_decay={self.frozen_weight_decay!r} must be a number >= 0")
        if self.frozen_weight_decay > 0 and self.mode != "freeze":
            raise ValueError(
                f"frozen_weight_decay={self.frozen_weight_decay} needs mode='freeze' (got mode={self.mode!r}): "
                "pruned entries are already zero"
            )
