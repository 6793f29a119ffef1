"""The one layer every DRT method trains through: Θ = ψ·ϑ + χ·Θ(0) (METHODS.md §1, eq. 7)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .ops import SampledWeightFunction, csr_pattern, sddmm_dtype, weight_op


class DRTLayer(nn.Module):
    """Wraps a module and trains only d entries of its weight.

    State (survey eq. 7):

    - ``drt_indices`` — ψ: the sorted flat indices (into ``weight.view(-1)``) of the d trained entries;
    - ``drt_values`` — ϑ: the d trained values, the layer's only trainable weight parameter;
    - χ·Θ(0): in ``mode="freeze"`` the untrained entries keep the base weight's values, and the
      base values at ψ are kept in ``drt_base_values`` so :meth:`unload` restores the base exactly;
      in ``mode="prune"`` they are zero.

    The effective weight Θ is kept materialised: in freeze mode it is the base module's own
    weight (ϑ written in place at ψ before each forward, cost ∝ d), in prune mode a zero tensor
    holding ϑ at ψ (the base weight stays untouched, so prune mode costs one extra weight copy).
    The backward computes the gradient of ϑ only at ψ (see :mod:`drt_peft.layer.ops`).
    """

    def __init__(self, base_layer: nn.Module, indices: Tensor, mode: str, train_bias: bool = False) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.op = weight_op(base_layer)
        self.mode = mode
        weight = base_layer.weight
        if not weight.is_contiguous():
            base_layer.weight = nn.Parameter(weight.detach().contiguous())
            weight = base_layer.weight
        weight.requires_grad_(False)
        if base_layer.bias is not None:
            base_layer.bias.requires_grad_(train_bias)
        indices = indices.to(device=weight.device, dtype=torch.int64)
        if indices.numel() > 1 and not bool((indices.diff() > 0).all()):
            raise ValueError("DRT indices must be sorted and unique")
        if indices.numel() and not 0 <= int(indices[0]) <= int(indices[-1]) < weight.numel():
            raise ValueError(f"DRT indices out of range for a weight of {weight.numel()} entries")
        self.register_buffer("drt_indices", indices)
        initial = weight.detach().reshape(-1)[indices].clone()
        if mode == "freeze":
            self.register_buffer("drt_base_values", initial.clone())
        elif mode == "prune":
            self.register_buffer("drt_effective", torch.zeros_like(weight), persistent=False)
        else:
            raise ValueError(f"mode={mode!r} is not supported; use 'freeze' or 'prune'")
        self.drt_values = nn.Parameter(initial)
        self._patterns: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    @property
    def weight_shape(self) -> torch.Size:
        return self.base_layer.weight.shape

    @property
    def num_trainable(self) -> int:
        """d: the number of trained weight entries."""
        return self.drt_indices.numel()

    @property
    def effective_weight(self) -> Tensor:
        """Θ as currently materialised (ϑ written at the last forward or :meth:`sync_weight`)."""
        return self.base_layer.weight if self.mode == "freeze" else self.drt_effective

    def sync_weight(self) -> Tensor:
        """Write ϑ into the materialised Θ at ψ and return Θ (cost ∝ d)."""
        weight = self.effective_weight
        with torch.no_grad():
            weight.view(-1).index_copy_(0, self.drt_indices, self.drt_values.detach().to(weight.dtype))
        return weight

    def get_mask(self) -> Tensor:
        """Boolean tensor shaped like the weight, True at the trained entries."""
        mask = torch.zeros(self.weight_shape, dtype=torch.bool, device=self.drt_indices.device)
        mask.view(-1)[self.drt_indices] = True
        return mask

    def _pattern(self, dtype: torch.dtype) -> Tensor:
        """CSR pattern of ψ for the SDDMM, built once per device and compute dtype."""
        key = (self.drt_indices.device, sddmm_dtype(dtype))
        if key not in self._patterns:
            self._patterns[key] = csr_pattern(self.drt_indices, self.op.pattern_shape, key[1])
        return self._patterns[key]

    def _apply(self, fn, recurse: bool = True):
        self._patterns.clear()
        return super()._apply(fn, recurse)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.sync_weight()
        bias = self.base_layer.bias
        if not torch.is_grad_enabled() or not (self.drt_values.requires_grad or x.requires_grad):
            return self.op.forward(x, weight, bias)
        if x.dtype != weight.dtype:
            x = x.to(weight.dtype)
        return SampledWeightFunction.apply(x, self.drt_values, bias, weight, self.op, self._pattern(weight.dtype))

    def merge(self) -> nn.Module:
        """The base module with Θ as its weight (prune mode: the sparse weight, zeros included)."""
        weight = self.sync_weight()
        if self.mode == "prune":
            with torch.no_grad():
                self.base_layer.weight.copy_(weight)
        return self.base_layer

    def unload(self) -> nn.Module:
        """The base module with its original weight Θ(0) (the trained values dropped)."""
        if self.mode == "freeze":
            with torch.no_grad():
                self.base_layer.weight.view(-1).index_copy_(0, self.drt_indices, self.drt_base_values)
        return self.base_layer

    def extra_repr(self) -> str:
        total = self.base_layer.weight.numel()
        return f"mode={self.mode!r}, trainable={self.num_trainable}/{total} ({self.num_trainable / total:.4%})"
