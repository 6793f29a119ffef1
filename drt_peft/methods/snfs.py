"""SNFS / sparse momentum (Dettmers & Zettlemoyer 2019): grow and redistribute by gradient momentum."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..config import register_method
from ..masks.budgets import apportion
from ..masks.dynamic import all_reduce_, capture_dense_gradients, regrow, smallest_magnitudes
from .base import DynamicConfig

if TYPE_CHECKING:
    from ..model import DRTModel


@register_method("snfs")
@dataclass
class SNFSConfig(DynamicConfig):
    """Sparse momentum: every step each layer keeps an exponential average m ← β·m + (1 − β)·∂L/∂Θ of
    its **dense** gradient; every ``update_frequency`` steps each layer drops the q_t fraction of its
    trained entries with the smallest |ϑ| (q_t cosine-decayed from ``drop_fraction`` to 0 at
    ``t_end``), and the total dropped is regrown across layers in proportion to each layer's mean
    |m| over its kept entries, inside each layer where |m| is largest. Total d stays exact; d per
    layer moves.

    Cost: a dense weight gradient in every backward and a D-sized momentum per layer — the one
    method here whose training state is not ∝ d. Per-layer sizes change, so it cannot run under
    DDP, whose gradient buckets are fixed at wrap time (SET and RigL can).

    Example::

        config = SNFSConfig(density=0.05, update_frequency=100, drop_fraction=0.5, t_end=5000)
        model = get_drt_model(base_model, config)
    """

    cosine_decay = True

    momentum: float = field(default=0.9, metadata={"help": "β of the dense-gradient momentum, 0 <= β < 1."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.momentum, (int, float)) or not 0 <= self.momentum < 1:
            raise ValueError(f"momentum={self.momentum!r} must satisfy 0 <= momentum < 1")

    def on_attach(self, model: DRTModel, step: int = 0) -> None:
        super().on_attach(model, step)
        for _, layer in model.drt_layers():
            if not hasattr(layer, "drt_momentum"):
                layer.register_buffer("drt_momentum", torch.zeros_like(layer.base_layer.weight, dtype=torch.float32))
        capture_dense_gradients((layer for _, layer in model.drt_layers()), True)

    def on_step(self, model: DRTModel, step: int, optimizer: Any) -> dict[str, float]:
        layers = [layer for _, layer in model.drt_layers()]
        if any(layer.dense_grad is None for layer in layers):
            raise RuntimeError("SNFS found no dense gradient: call model.update_masks after every optimizer step")
        grads = [all_reduce_(layer.dense_grad) for layer in layers]
        if all(bool(torch.isfinite(grad).all()) for grad in grads):  # a non-finite step would poison m for good
            for layer, grad in zip(layers, grads, strict=True):
                layer.drt_momentum.mul_(self.momentum).add_(grad, alpha=1 - self.momentum)
        else:
            warnings.warn(f"step {step}: non-finite gradients; SNFS leaves its momentum as it was", stacklevel=2)
        for layer in layers:
            layer.dense_grad = None
        if not self.updates_at(model, step):
            return {}
        self.require_single_process()
        fraction = self.drop_fraction_at(step)
        dropped = [smallest_magnitudes(layer, round(fraction * layer.num_trainable)) for layer in layers]
        kept = [layer.drt_indices[~drop] for layer, drop in zip(layers, dropped, strict=True)]
        shares = [
            float(layer.drt_momentum.reshape(-1)[k].abs().mean()) if k.numel() else 0.0
            for layer, k in zip(layers, kept, strict=True)
        ]
        caps = [layer.drt_momentum.numel() - k.numel() for layer, k in zip(layers, kept, strict=True)]
        total = sum(int(drop.sum()) for drop in dropped)
        for layer, drop, grow in zip(layers, dropped, apportion(total, shares, caps), strict=True):
            regrow(layer, drop, grow, layer.drt_momentum.abs(), optimizer)
        return {"drt/moved": float(total), "drt/drop_fraction": fraction}
