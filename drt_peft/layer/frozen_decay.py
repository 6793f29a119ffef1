"""A freeze-mode layer whose frozen entries decay: Θ = ψ·ϑ + s·χ·Θ(0) (FreezeNet, Wimmer et al. 2021)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .layer import DRTLayer
from .ops import DenseProduct


class FrozenDecayLayer(DRTLayer):
    """A freeze-mode :class:`~drt_peft.DRTLayer` whose frozen entries share one scalar s, Θ = ψ·ϑ + s·χ·Θ(0).

    :meth:`decay_frozen` multiplies s by a factor, the weight decay an optimizer would apply to the
    frozen entries, at cost O(1) and with no D-sized optimizer state. The products compute
    Θ = s·M with M holding Θ(0) off ψ and ϑ/s on ψ, so Θ(0) stays intact for :meth:`unload`. s is
    stored in the adapter (:meth:`adapter_tensors`) and in state dicts (its extra state), so Trainer
    checkpoints resume it; entries grown by :meth:`update_indices` start at s·Θ(0).
    """

    def __init__(self, base_layer: nn.Module, indices: Tensor, train_bias: bool = False) -> None:
        super().__init__(base_layer, indices, "freeze", train_bias)
        self.frozen_scale = 1.0

    def decay_frozen(self, factor: float) -> None:
        """s ← s · ``factor``: scale the frozen (untrained) entries; ϑ is unaffected."""
        if not factor > 0:
            raise ValueError(f"decay factor={factor!r} must be > 0 (lr · frozen_weight_decay must stay below 1)")
        self.frozen_scale *= factor

    def _materialised(self) -> Tensor:
        """M with Θ = s·M: the base weight with ϑ/s written at ψ."""
        weight = self.base_layer.weight
        with torch.no_grad():
            values = self.drt_values.detach() / self.frozen_scale
            weight.view(-1).index_copy_(0, self.drt_indices, values.to(weight.dtype))
        return weight

    def effective_weight(self) -> Tensor:
        weight = self._materialised() * self.frozen_scale
        weight.view(-1)[self.drt_indices] = self.drt_values.detach().to(weight.dtype)
        return weight

    def _product(self) -> DenseProduct:
        return DenseProduct(self.op, self._materialised, self.frozen_scale)

    def _frozen_values(self, base: Tensor) -> Tensor:
        return base * self.frozen_scale

    def adapter_tensors(self) -> dict[str, Tensor]:
        """s, as a float64 scalar."""
        return {"frozen_scale": torch.tensor(self.frozen_scale, dtype=torch.float64)}

    def load_adapter_tensors(self, tensors: dict[str, Tensor]) -> None:
        if set(tensors) != {"frozen_scale"}:
            raise ValueError(f"FrozenDecayLayer stores exactly ['frozen_scale'], got {sorted(tensors)}")
        self.frozen_scale = float(tensors["frozen_scale"])

    def get_extra_state(self) -> Tensor:
        """s as a tensor, so state dicts stay tensor-only (safetensors, Trainer checkpoints)."""
        return torch.tensor(self.frozen_scale, dtype=torch.float64)

    def set_extra_state(self, state: Tensor) -> None:
        self.frozen_scale = float(state)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, frozen_scale={self.frozen_scale:.6g}"
