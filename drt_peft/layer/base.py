"""What every DRT layer is, whatever its embedding: the wrapped module, ψ and ϑ, merge and unload."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .ops import weight_op


def checked_indices(indices: Tensor, weight: Tensor) -> Tensor:
    """``indices`` as int64 on the weight's device, refused unless sorted, unique and inside the weight."""
    indices = indices.to(device=weight.device, dtype=torch.int64)
    if indices.numel() > 1 and not bool((indices.diff() > 0).all()):
        raise ValueError("DRT indices must be sorted and unique")
    if indices.numel() and not 0 <= int(indices[0]) <= int(indices[-1]) < weight.numel():
        raise ValueError(f"DRT indices out of range for a weight of {weight.numel()} entries")
    return indices


class BaseDRTLayer(nn.Module):
    """The base of every DRT layer: it wraps ``base_layer`` and trains a reparameterisation of its weight.

    What every layer has, and what the model, the checkpoints and the methods rely on:

    - ``base_layer``: the wrapped module, whose weight is frozen; ``op`` its products
      (:func:`~drt_peft.layer.ops.weight_op`); its other attributes read through the layer;
    - ``drt_indices`` (ψ, sorted flat indices into the weight, empty for layers that select no
      entries) and ``drt_values`` (ϑ, the trained values, possibly empty);
    - with ``train_bias`` the base bias trains, kept aside (``drt_base_bias``) so :meth:`unload`
      restores it;
    - :meth:`effective_weight` (Θ), :meth:`merge`, :meth:`unload`, and :meth:`adapter_tensors` /
      :meth:`load_adapter_tensors` for what a subclass stores beyond ψ and ϑ.

    :class:`~drt_peft.DRTLayer` is the sparse embedding Θ = ψ·ϑ + χ·Θ(0); layers whose embedding
    replaces ψ (a projection, a fixed classifier) derive from this base directly.
    """

    def __init__(self, base_layer: nn.Module, indices: Tensor, train_bias: bool = False) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.op = weight_op(base_layer)
        weight = base_layer.weight
        if not weight.is_contiguous():
            base_layer.weight = nn.Parameter(weight.detach().contiguous())
            weight = base_layer.weight
        weight.requires_grad_(False)
        if base_layer.bias is not None:
            base_layer.bias.requires_grad_(train_bias)
            if train_bias:  # the base bias, so that :meth:`unload` restores it after training
                self.register_buffer("drt_base_bias", base_layer.bias.detach().clone(), persistent=False)
        indices = checked_indices(indices, weight)
        self.register_buffer("drt_indices", indices)
        self.drt_values = nn.Parameter(weight.detach().reshape(-1)[indices].clone())

    @property
    def weight_shape(self) -> torch.Size:
        return self.base_layer.weight.shape

    @property
    def num_trainable(self) -> int:
        """d: the number of trained weight entries."""
        return self.drt_indices.numel()

    def effective_weight(self) -> Tensor:
        """Θ with the current ϑ, as a dense tensor shaped like the weight."""
        raise NotImplementedError

    def sparse_weight(self) -> tuple[Tensor, Tensor] | None:
        """Θ as ``(ψ, Θ[ψ])`` when it is zero outside ψ (a pruned layer), else None (Θ is dense; here always)."""
        return None

    def get_mask(self) -> Tensor:
        """Boolean tensor shaped like the weight, True at the trained entries."""
        mask = torch.zeros(self.weight_shape, dtype=torch.bool, device=self.drt_indices.device)
        mask.view(-1)[self.drt_indices] = True
        return mask

    def upcast_adapter_tensors(self) -> None:
        """Store the layer's own float16/bfloat16 Parameters in float32 (``autocast_adapter_dtype``).

        These are the tensors the layer trains (ϑ, a subclass's scores); the base module's
        parameters keep the weight's dtype. Every product casts them to the weight's dtype where
        they are used, or computes their gradient in float32, so training works the same, only with
        float32 optimizer updates and states. Call it before the optimizer is built.
        """
        for param in self.parameters(recurse=False):
            if param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.float()

    def __getattr__(self, name: str) -> Any:
        """The wrapped module's attributes (``weight``, ``bias``, ``in_features``, ``kernel_size``, ...), so model
        code that reads them keeps working. ``weight`` is the base module's tensor: its dtype, device and shape
        are the layer's; for Θ itself use :meth:`effective_weight`."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "_cache") or name.startswith("drt_"):
                raise
            return getattr(self.base_layer, name)

    def adapter_tensors(self) -> dict[str, Tensor]:
        """Tensors beyond ψ and ϑ that a subclass stores in the adapter file (none here)."""
        return {}

    def load_adapter_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Restore what :meth:`adapter_tensors` returned when the adapter was saved."""
        if tensors:
            raise ValueError(f"{type(self).__name__} stores no extra adapter tensors, got {sorted(tensors)}")

    def _restore_frozen(self) -> None:
        """Write back what the embedding displaced in the base weight (nothing here)."""

    def merge(self) -> nn.Module:
        """The base module with Θ as its weight."""
        weight = self.effective_weight()
        if weight is not self.base_layer.weight:
            with torch.no_grad():
                self.base_layer.weight.copy_(weight)
        return self.base_layer

    def suspend(self) -> nn.Module:
        """The base module as :meth:`unload` gives it, while the layer keeps its trained state (a trained bias
        included, as the buffer ``drt_trained_bias``), so that :meth:`resume` puts it back exactly: another
        adapter becomes active, or the adapter is disabled for a while."""
        if hasattr(self, "drt_base_bias"):
            self.register_buffer("drt_trained_bias", self.base_layer.bias.detach().clone(), persistent=False)
        return self.unload()

    def resume(self) -> None:
        """Undo :meth:`suspend` before the layer takes the base module's place again: the trained bias goes
        back (the products write ϑ into Θ in each forward)."""
        trained = self._buffers.pop("drt_trained_bias", None)
        if trained is not None:
            with torch.no_grad():
                self.base_layer.bias.copy_(trained)

    def trained_bias(self) -> Tensor | None:
        """The bias this layer trains (set aside while suspended), or None when the bias does not train."""
        if not hasattr(self, "drt_base_bias"):
            return None
        return self._buffers.get("drt_trained_bias", self.base_layer.bias.detach())

    def unload(self) -> nn.Module:
        """The base module with its original weight Θ(0) and bias (the trained values and bias dropped)."""
        self._restore_frozen()
        if hasattr(self, "drt_base_bias"):
            with torch.no_grad():
                self.base_layer.bias.copy_(self.drt_base_bias)
        return self.base_layer
