"""SNFS / sparse momentum (Dettmers & Zettlemoyer 2019): grow and redistribute by gradient momentum."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .. import schedules
from ..config import Paper, register_method
from ..masks.budgets import apportion
from ..masks.dynamic import all_reduce_, capture_dense_gradients
from .drop_and_grow import DropAndGrow, DynamicConfig

if TYPE_CHECKING:
    from torch import Tensor

    from ..layer import DRTLayer
    from ..model import DRTModel


class SNFSPolicy(DropAndGrow):
    """Drop and grow with a dense-gradient momentum per layer (buffer ``momentum_<i>``)."""

    config: SNFSConfig

    def on_attach(self, model: DRTModel, step: int = 0) -> None:
        super().on_attach(model, step)
        for i, (_, layer) in enumerate(model.drt_layers()):
            if not hasattr(self, f"momentum_{i}"):
                self.register_buffer(f"momentum_{i}", torch.zeros_like(layer.base_layer.weight, dtype=torch.float32))
        capture_dense_gradients((layer for _, layer in model.drt_layers()), True)

    def momentum(self, i: int) -> Tensor:
        """m of the i-th layer."""
        return getattr(self, f"momentum_{i}")

    def observe(self, model: DRTModel, step: int) -> None:
        """m ← β·m + (1 − β)·∂L/∂Θ for every layer (summed over processes); a non-finite gradient is left out."""
        layers = [layer for _, layer in model.drt_layers()]
        if any(layer.dense_grad is None for layer in layers):
            raise RuntimeError("SNFS found no dense gradient: call model.update_masks after every optimizer step")
        grads = [all_reduce_(layer.dense_grad) for layer in layers]
        if all(bool(torch.isfinite(grad).all()) for grad in grads):  # a non-finite step would poison m for good
            beta = self.config.momentum
            for i, grad in enumerate(grads):
                self.momentum(i).mul_(beta).add_(grad, alpha=1 - beta)
        else:
            warnings.warn(f"step {step}: non-finite gradients; SNFS leaves its momentum as it was", stacklevel=3)
        for layer in layers:
            layer.dense_grad = None

    def grow_counts(self, model: DRTModel, dropped: list[Tensor]) -> list[int]:
        """All dropped entries, regrown across layers in proportion to each layer's mean |m| over the entries it
        trained when the update began, the dropped ones included: "the mean momentum magnitude of existing
        weights" (Dettmers & Zettlemoyer 2019; their code takes it before pruning)."""
        self.require_single_process()
        layers = [layer for _, layer in model.drt_layers()]
        shares = [
            float(self.momentum(i).reshape(-1)[layer.drt_indices].abs().mean()) if layer.num_trainable else 0.0
            for i, layer in enumerate(layers)
        ]
        caps = [
            layer.base_layer.weight.numel() - layer.num_trainable + int(drop.sum())
            for layer, drop in zip(layers, dropped, strict=True)
        ]
        return apportion(sum(int(drop.sum()) for drop in dropped), shares, caps)

    def grow_scores(self, i: int, name: str, layer: DRTLayer, step: int) -> Tensor:
        """|m|: grow where the momentum of the dense gradient is largest."""
        return self.momentum(i).abs()


@register_method("snfs")
@dataclass(frozen=True)
class SNFSConfig(DynamicConfig):
    """Sparse momentum: every step each layer keeps an exponential average m ← β·m + (1 − β)·∂L/∂Θ of
    its **dense** gradient; every ``update_frequency`` steps each layer drops the q_t fraction of its
    trained entries with the smallest |ϑ| (q_t cosine-decayed from ``drop_fraction``, the paper's
    prune rate 0.5 by default, to 0 at ``t_end``), and the total dropped is regrown across layers
    in proportion to each layer's mean |m| over its trained entries before the drop, inside each
    layer where |m| is largest (the just-dropped entries included, which then start afresh). Total
    d stays exact; d per layer moves. m is the state of the policy (``model.drt_policy.momentum_<i>``
    for the i-th layer) and travels in Trainer checkpoints.

    Cost: a dense weight gradient in every backward and a D-sized momentum per layer — the one
    method here whose training state is not ∝ d. Per-layer sizes change, so it cannot run under
    DDP, whose gradient buckets are fixed at wrap time (SET and RigL can).

    Example::

        config = SNFSConfig(density=0.05, update_frequency=100, drop_fraction=0.5, t_end=5000)
        model = get_drt_model(base_model, config)
    """

    paper = Paper(
        "Dettmers & Zettlemoyer",
        "Sparse Networks from Scratch: Faster Training without Losing Performance",
        "arXiv",
        2019,
    )

    drop_decay = staticmethod(schedules.cosine_decay)
    policy = SNFSPolicy

    drop_fraction: float = field(
        default=0.5,
        metadata={
            "help": "α: fraction of each layer's trained entries dropped and regrown at the first update, "
            "cosine-decayed to 0 at t_end (the paper's prune rate, 0.5)."
        },
    )
    momentum: float = field(default=0.9, metadata={"help": "β of the dense-gradient momentum, 0 <= β < 1."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.momentum, (int, float)) or not 0 <= self.momentum < 1:
            raise ValueError(f"momentum={self.momentum!r} must satisfy 0 <= momentum < 1")
