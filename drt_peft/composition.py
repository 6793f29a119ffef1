"""Composing sparse adapters on one base: Θ = Θ(0) + Σᵢ wᵢ·Δᵢ, each Δᵢ on its own ψᵢ.

Sparse fine-tunings compose (Ansell et al., *Composable Sparse Fine-Tuning for Cross-Lingual
Transfer*, ACL 2022): Δᵢ = ψᵢ·(ϑᵢ − Θ(0)) is the change adapter i makes to a weight, and the
composed adapter trains ψ = ∪ᵢ ψᵢ with ϑ = Θ(0)[ψ] + Σᵢ wᵢ·Δᵢ[ψ]. The same rule combines what the
adapters train in full (biases, ``modules_to_save``): original + Σᵢ wᵢ·(trainedᵢ − original).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .config import DRTConfig, Paper, register_method
from .layer import BaseDRTLayer, DRTLayer


def layer_delta(name: str, layer: BaseDRTLayer) -> tuple[Tensor, Tensor]:
    """``(ψ, ϑ − Θ(0)[ψ])`` of a sparse layer (Θ(0) is zero off the base in prune mode); other embeddings refuse."""
    if type(layer) is not DRTLayer:
        raise ValueError(
            f"layer {name} is a {type(layer).__name__}: composition adds sparse changes Θ(0) + ψ·Δ, which only "
            "the plain sparse layer (DRTLayer) makes"
        )
    values = layer.drt_values.detach().double()
    base = layer.drt_base_values.double() if layer.mode == "freeze" else torch.zeros_like(values)
    return layer.drt_indices, values - base


def weighted_union(deltas: list[tuple[Tensor, Tensor]], weights: Sequence[float]) -> tuple[Tensor, Tensor]:
    """ψ = ∪ᵢ ψᵢ (sorted) and Σᵢ wᵢ·Δᵢ on it, in float64."""
    indices = torch.unique(torch.cat([idx for idx, _ in deltas]))
    total = torch.zeros(indices.numel(), dtype=torch.float64, device=indices.device)
    for (idx, delta), weight in zip(deltas, weights, strict=True):
        total.index_add_(0, torch.searchsorted(indices, idx), delta, alpha=weight)
    return indices, total


def weighted_change(original: Tensor, trained: list[Tensor | None], weights: Sequence[float]) -> Tensor:
    """original + Σᵢ wᵢ·(trainedᵢ − original), where an adapter that did not train the tensor (None) adds nothing;
    a tensor that is not floating point (a counter) keeps the original."""
    if not original.is_floating_point():
        return original.clone()
    total = original.double()
    for tensor, weight in zip(trained, weights, strict=True):
        if tensor is not None:
            total = total + weight * (tensor.double() - original.double())
    return total.to(original.dtype)


def weighted_state(
    original: dict[str, Tensor], trained: list[dict[str, Tensor] | None], weights: Sequence[float]
) -> dict[str, Tensor]:
    """:func:`weighted_change` of every tensor of a module's state dict."""
    return {
        key: weighted_change(base, [None if state is None else state[key] for state in trained], weights)
        for key, base in original.items()
    }


def mask_overlap(names: list[str], masks: list[list[Tensor]]) -> dict[str, float]:
    """How the adapters' ψ overlap: ``union`` (|∪ψ|), ``shared`` (entries in more than one ψ) and, per pair,
    ``jaccard:<a>:<b>`` = |ψ_a ∩ ψ_b| / |ψ_a ∪ ψ_b| over all layers."""
    counts = [torch.unique(torch.cat(layer), return_counts=True)[1] for layer in zip(*masks, strict=True)]
    report = {
        "union": float(sum(c.numel() for c in counts)),
        "shared": float(sum(int((c > 1).sum()) for c in counts)),
    }
    for (a, ma), (b, mb) in itertools.combinations(zip(names, masks, strict=True), 2):
        common = sum(int(torch.isin(x, y).sum()) for x, y in zip(ma, mb, strict=True))
        union = sum(x.numel() for x in ma) + sum(y.numel() for y in mb) - common
        report[f"jaccard:{a}:{b}"] = common / union if union else 1.0
    return report


@register_method("composed")
@dataclass(frozen=True)
class ComposedConfig(DRTConfig):
    """Θ = Θ(0) + Σᵢ wᵢ·Δᵢ: adapters trained on one base, combined (see :mod:`drt_peft.composition`).

    Ansell, Ponti, Korhonen & Vulić, *Composable Sparse Fine-Tuning for Cross-Lingual Transfer*
    (ACL 2022): sparse fine-tunings of one base add up, e.g. a language adapter and a task
    adapter. ``DRTModel.add_weighted_adapter(adapters, weights, adapter_name)`` makes this config:
    ψ is the union of the adapters' ψ (stored in the checkpoint), ϑ = Θ(0)[ψ] + Σᵢ wᵢ·Δᵢ[ψ], and what
    the adapters train in full (biases, ``modules_to_save``) combines by the same rule. The
    adapters must share the base, the targeted layers and the mode. The composed adapter can be
    trained further like any static one.

    Example::

        model.add_weighted_adapter(["language", "task"], [1.0, 1.0], "language+task")
        model.set_adapter("language+task")
    """

    sized_by_density = False
    paper = Paper(
        "Ansell, Ponti, Korhonen & Vulić", "Composable Sparse Fine-Tuning for Cross-Lingual Transfer", "ACL", 2022
    )

    adapters: tuple[str, ...] = field(
        default=(), metadata={"help": "Names of the combined adapters, in the order of `weights`."}
    )
    weights: tuple[float, ...] = field(default=(), metadata={"help": "The weight wᵢ of each adapter."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self._normalise("adapters", tuple(self.adapters))
        self._normalise("weights", tuple(self.weights))
        if not self.adapters or len(self.adapters) != len(self.weights):
            raise ValueError(
                f"adapters={self.adapters!r}, weights={self.weights!r}: name at least one adapter and give one "
                "weight per adapter"
            )
        bad = [
            w for w in self.weights if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)
        ]
        if bad:
            raise ValueError(f"weights={self.weights!r}: every weight must be a finite number, got {bad}")

    @property
    def stores_indices(self) -> bool:
        """Always: the union of the adapters' ψ is a function of their training, not of the seed."""
        return True
