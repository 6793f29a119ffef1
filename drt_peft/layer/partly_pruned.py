"""A freeze-mode layer with some untrained entries pruned: Θ = ψ·ϑ + χ_frozen·Θ(0) (+ 0 on χ_pruned).

Zhou et al. 2019 (*Deconstructing lottery tickets*, "mask-0 actions") split the untrained entries
in two: those frozen at their initial value and those set to zero. ψ and ϑ behave as in any
freeze-mode :class:`DRTLayer`; the pruned positions (sorted flat indices, ``drt_pruned``) are
zeroed in the base weight, their Θ(0) kept aside (non-persistent) so :meth:`unload` restores the
base exactly. The pruned set is stored in the adapter, in the checkpoint's compact index codecs.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from ..index_codecs import CODECS, decode, encode_smallest
from .base import checked_indices
from .layer import DRTLayer


class PartlyPrunedLayer(DRTLayer):
    """Freeze-mode DRT layer whose entries at ``drt_pruned`` (disjoint from ψ) are zero."""

    def __init__(self, base_layer: nn.Module, indices: Tensor, train_bias: bool = False) -> None:
        super().__init__(base_layer, indices, "freeze", train_bias)
        self.register_buffer("drt_pruned", torch.empty(0, dtype=torch.int64, device=indices.device))
        self.register_buffer("drt_pruned_base", torch.empty(0, dtype=self.base_layer.weight.dtype), persistent=False)

    def prune(self, pruned: Tensor) -> None:
        """Set the pruned entries to ``pruned`` (sorted flat indices outside ψ); the previous ones return to Θ(0)."""
        weight = self.base_layer.weight.detach().view(-1)
        pruned = checked_indices(pruned, self.base_layer.weight)
        if bool(torch.isin(pruned, self.drt_indices).any()):
            raise ValueError("pruned entries must lie outside ψ (the trained entries)")
        with torch.no_grad():
            weight[self.drt_pruned] = self.drt_pruned_base
            self.drt_pruned_base = weight[pruned].clone()
            weight[pruned] = 0
        self.drt_pruned = pruned

    def adapter_tensors(self) -> dict[str, Tensor]:
        codec, blob = encode_smallest(self.drt_pruned.cpu().numpy(), self.base_layer.weight.numel())
        return {
            "pruned_codec": torch.tensor([CODECS.index(codec), self.drt_pruned.numel()], dtype=torch.int64),
            "pruned_bytes": torch.from_numpy(np.ascontiguousarray(blob)),
        }

    def load_adapter_tensors(self, tensors: dict[str, Tensor]) -> None:
        if set(tensors) != {"pruned_codec", "pruned_bytes"}:
            raise ValueError(f"a partly pruned layer stores pruned_codec and pruned_bytes, got {sorted(tensors)}")
        code, count = tensors["pruned_codec"].tolist()
        numel = self.base_layer.weight.numel()
        self.prune(torch.from_numpy(decode(tensors["pruned_bytes"].numpy(), CODECS[code], count, numel)))

    def resume(self) -> None:
        """As :meth:`DRTLayer.resume`, and the pruned entries are zero again (:meth:`unload` restored them)."""
        super().resume()
        with torch.no_grad():
            self.base_layer.weight.view(-1)[self.drt_pruned] = 0

    def unload(self) -> nn.Module:
        with torch.no_grad():
            self.base_layer.weight.view(-1)[self.drt_pruned] = self.drt_pruned_base
        return super().unload()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pruned={self.drt_pruned.numel()}"
