"""A freeze-mode layer whose dropped entries keep their trained values: FISH re-scoring (Sung et al. 2021).

When FISH re-computes its mask during training, the weights it stops training keep their current
values rather than returning to Θ(0). Here an entry leaving ψ therefore freezes at the value ϑ it
was trained to, and an entry that joins ψ again starts from that value. These *retained* entries
(sorted flat indices outside ψ, ``drt_retained``) hold their values (``drt_retained_values``, the
weight's dtype) in the base weight; their Θ(0) is kept aside (``drt_retained_base``) so
:meth:`unload` restores the base exactly, and ``drt_base_values`` holds Θ(0) at ψ as in any
freeze-mode layer. The retained entries travel in the adapter (their positions in the compact
index codecs, and their values) and in state dicts (the layer's extra state), so Trainer
checkpoints resume them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..index_codecs import CODECS, decode, encode_smallest
from .base import checked_indices
from .layer import DRTLayer

RETAINED_KEYS = {"retained_codec", "retained_bytes", "retained_values"}


class RetainingLayer(DRTLayer):
    """Freeze-mode DRT layer whose entries leaving ψ keep their trained value as their frozen value."""

    def __init__(self, base_layer: nn.Module, indices: Tensor, train_bias: bool = False) -> None:
        super().__init__(base_layer, indices, "freeze", train_bias)
        weight = self.base_layer.weight
        self.register_buffer("drt_retained", torch.empty(0, dtype=torch.int64, device=weight.device), persistent=False)
        self.register_buffer("drt_retained_values", weight.new_empty(0), persistent=False)
        self.register_buffer("drt_retained_base", weight.new_empty(0), persistent=False)

    def update_indices(
        self, indices: Tensor, optimizer: torch.optim.Optimizer | None = None, *, fresh: Tensor | None = None
    ) -> None:
        """As :meth:`DRTLayer.update_indices`, except that entries leaving ψ keep their value ϑ as their frozen
        value, and retained entries joining ψ again start from it (with zero optimizer state). Entries marked
        ``fresh`` restart from Θ(0), as in :class:`DRTLayer`."""
        weight = self.base_layer.weight
        indices = checked_indices(indices, weight)
        flat = weight.detach().view(-1)
        with torch.no_grad():
            leaving = ~torch.isin(self.drt_indices, indices)
            left = self.drt_indices[leaving]
            left_values = self.drt_values.detach()[leaving].to(weight.dtype)
            left_base = self.drt_base_values[leaving]
            joining = torch.isin(self.drt_retained, indices)
            # Θ(0) back where retained entries join ψ, so that ψ records Θ(0) there for unload
            flat[self.drt_retained[joining]] = self.drt_retained_base[joining]
        rejoined, start = self.drt_retained[joining], self.drt_retained_values[joining]
        super().update_indices(indices, optimizer, fresh=fresh)
        with torch.no_grad():
            self.drt_values[torch.searchsorted(indices, rejoined)] = start.to(self.drt_values.dtype)
            flat[left] = left_values
            retained = torch.cat([self.drt_retained[~joining], left])
            order = retained.argsort()
            self.drt_retained = retained[order]
            self.drt_retained_values = torch.cat([self.drt_retained_values[~joining], left_values])[order]
            self.drt_retained_base = torch.cat([self.drt_retained_base[~joining], left_base])[order]

    def retain(self, indices: Tensor, values: Tensor) -> None:
        """Make ``indices`` (sorted flat indices outside ψ) the retained entries, frozen at ``values``; the previous
        ones return to Θ(0)."""
        weight = self.base_layer.weight
        indices = checked_indices(indices, weight)
        if bool(torch.isin(indices, self.drt_indices).any()):
            raise ValueError("retained entries must lie outside ψ (the trained entries)")
        if values.shape != indices.shape:
            raise ValueError(f"{indices.numel()} retained entries need as many values, got {tuple(values.shape)}")
        flat = weight.detach().view(-1)
        with torch.no_grad():
            flat[self.drt_retained] = self.drt_retained_base
            self.drt_retained_base = flat[indices].clone()
            self.drt_retained_values = values.to(device=weight.device, dtype=weight.dtype)
            flat[indices] = self.drt_retained_values
        self.drt_retained = indices

    def _restore_frozen(self) -> None:
        """Θ(0) at ψ and at the retained entries."""
        super()._restore_frozen()
        with torch.no_grad():
            self.base_layer.weight.view(-1)[self.drt_retained] = self.drt_retained_base

    def resume(self) -> None:
        """As :meth:`DRTLayer.resume`, and the retained entries hold their values again (:meth:`unload` restored
        Θ(0) there)."""
        super().resume()
        with torch.no_grad():
            self.base_layer.weight.view(-1)[self.drt_retained] = self.drt_retained_values

    def adapter_tensors(self) -> dict[str, Tensor]:
        """The retained entries, if any: their positions (smallest lossless codec) and values."""
        if not self.drt_retained.numel():
            return {}
        codec, blob = encode_smallest(self.drt_retained.cpu().numpy(), self.base_layer.weight.numel())
        return {
            "retained_codec": torch.tensor([CODECS.index(codec), self.drt_retained.numel()], dtype=torch.int64),
            "retained_bytes": torch.from_numpy(np.ascontiguousarray(blob)),
            "retained_values": self.drt_retained_values,
        }

    def load_adapter_tensors(self, tensors: dict[str, Tensor]) -> None:
        if not tensors:  # nothing retained (or an adapter saved before entries were retained)
            self.retain(self.drt_retained.new_empty(0), self.drt_retained_values.new_empty(0))
            return
        if set(tensors) != RETAINED_KEYS:
            raise ValueError(f"a retaining layer stores {sorted(RETAINED_KEYS)} or nothing, got {sorted(tensors)}")
        code, count = tensors["retained_codec"].tolist()
        numel = self.base_layer.weight.numel()
        indices = torch.from_numpy(decode(tensors["retained_bytes"].numpy(), CODECS[code], count, numel))
        self.retain(indices, tensors["retained_values"])

    def get_extra_state(self) -> Tensor:
        """The retained positions and values as one float64 ``[2, n]`` tensor (exact for every index below 2⁵³
        and every float dtype up to 64 bits), so state dicts stay tensor-only."""
        return torch.stack([self.drt_retained.to(torch.float64), self.drt_retained_values.to(torch.float64)])

    def set_extra_state(self, state: Tensor) -> None:
        indices, values = state.to(torch.float64)
        self.retain(indices.to(torch.int64), values)

    def _load_from_state_dict(self, state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
        """As :meth:`DRTLayer._load_from_state_dict`; a state with ψ but without retained entries (saved before
        this layer retained any) leaves none."""
        super()._load_from_state_dict(state_dict, prefix, *args)
        if prefix + "drt_indices" in state_dict and prefix + "_extra_state" not in state_dict:
            self.retain(self.drt_retained.new_empty(0), self.drt_retained_values.new_empty(0))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, retained={self.drt_retained.numel()}"
