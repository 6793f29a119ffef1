"""DSR (Mostafa & Wang 2019): a global adaptive magnitude threshold, random regrowth redistributed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..config import Paper, register_method
from ..masks.budgets import apportion
from ..masks.dynamic import drop_weights
from .drop_and_grow import DropAndGrow, DynamicConfig

if TYPE_CHECKING:
    from torch import Tensor

    from ..model import DRTModel


class DSRPolicy(DropAndGrow):
    """Drop by one adaptive global threshold H (buffer ``threshold``), regrow redistributed by kept entries."""

    config: DSRConfig

    def on_attach(self, model: DRTModel, step: int = 0) -> None:
        super().on_attach(model, step)
        if not hasattr(self, "threshold"):
            self.register_buffer("threshold", torch.tensor(self.config.initial_threshold, dtype=torch.float64))

    def drop(self, model: DRTModel, step: int) -> list[Tensor]:
        """Every trained entry with |ϑ| < H (|ϑ − Θ(0)| with ``drop_criterion="change"``), one threshold H for all
        layers."""
        threshold, criterion = float(self.threshold), self.config.drop_criterion
        return [drop_weights(layer, criterion).abs() < threshold for _, layer in model.drt_layers()]

    def grow_counts(self, model: DRTModel, dropped: list[Tensor]) -> list[int]:
        """All dropped entries, regrown across layers in proportion to each layer's kept entries."""
        self.require_single_process()
        layers = [layer for _, layer in model.drt_layers()]
        kept = [layer.num_trainable - int(drop.sum()) for layer, drop in zip(layers, dropped, strict=True)]
        caps = [layer.base_layer.weight.numel() - k for layer, k in zip(layers, kept, strict=True)]
        return apportion(sum(int(drop.sum()) for drop in dropped), kept, caps)

    def after_update(self, model: DRTModel, step: int, dropped: list[Tensor]) -> dict[str, float]:
        """H doubles when fewer than (1 − δ) of the ``drop_fraction`` target were dropped, halves when more than
        (1 + δ)."""
        total = sum(int(drop.sum()) for drop in dropped)
        target = self.config.drop_fraction * sum(layer.num_trainable for _, layer in model.drt_layers())
        if total < (1 - self.config.tolerance) * target:
            self.threshold.mul_(2)
        elif total > (1 + self.config.tolerance) * target:
            self.threshold.div_(2)
        return {"drt/dsr_threshold": float(self.threshold)}


@register_method("dsr")
@dataclass(frozen=True)
class DSRConfig(DynamicConfig):
    """Dynamic sparse reparameterization: every ``update_frequency`` steps, drop every trained entry with
    |ϑ| < H, one threshold H for all layers, and regrow as many across layers in proportion to each
    layer's kept entries, at random positions drawn from ``(seed, step, layer)``. H adapts toward
    dropping ``drop_fraction`` of d per update: doubled when fewer than (1 − tolerance) of that
    target were dropped, halved when more than (1 + tolerance). Total d stays exact; d per layer
    moves (so, unlike SET and RigL, not under DDP). H is the state of the policy
    (``model.drt_policy.threshold``) and travels in Trainer checkpoints.

    Example::

        config = DSRConfig(density=0.1, update_frequency=100, drop_fraction=0.2, initial_threshold=1e-3)
        model = get_drt_model(base_model, config)
    """

    paper = Paper(
        "Mostafa & Wang",
        "Parameter Efficient Training of Deep Convolutional Neural Networks by Dynamic Sparse Reparameterization",
        "ICML",
        2019,
    )

    policy = DSRPolicy

    initial_threshold: float = field(default=1e-3, metadata={"help": "H at the first update, > 0."})
    tolerance: float = field(
        default=0.1, metadata={"help": "δ: H stays when the dropped count is within (1 ± δ)·target."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.initial_threshold, (int, float)) or self.initial_threshold <= 0:
            raise ValueError(f"initial_threshold={self.initial_threshold!r} must be > 0")
        if not isinstance(self.tolerance, (int, float)) or not 0 <= self.tolerance < 1:
            raise ValueError(f"tolerance={self.tolerance!r} must satisfy 0 <= tolerance < 1")
