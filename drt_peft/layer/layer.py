"""The one layer every DRT method trains through: Θ = ψ·ϑ + χ·Θ(0) (survey §2.2, eq. 7; docs/concepts.md)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import BaseDRTLayer, checked_indices
from .ops import (
    Conv1DOp,
    CSRLayout,
    DenseProduct,
    KernelCache,
    LinearOp,
    SampledWeightFunction,
    compute_dtype,
    csr_pattern,
    sddmm_dtype,
)

#: Prune-mode Linear/Conv1D layers at or below this density run their products on CSR kernels (on the devices of
#: :data:`CSR_DEVICE_TYPES`).
CSR_MAX_DENSITY = 0.03
#: The device types on which such layers use the CSR kernels: where they were measured to beat dense products
#: (CPU, ``benchmarks/layer_kernels.py``). Elsewhere (CUDA: dense bfloat16/float16 products run on the tensor
#: cores, the CSR kernels in float32 on the CUDA cores; ``benchmarks/gpu_step.py`` measures both) the same layer
#: runs dense products; the choice follows the weight's device when the model moves.
CSR_DEVICE_TYPES: tuple[str, ...] = ("cpu",)


def _set_values(param: nn.Parameter, values: Tensor) -> None:
    """``param.data = values`` for ``values`` of any size, keeping ``param`` itself (the optimizer's key, its hooks).

    Autograd checks each gradient that reaches a leaf against the shape recorded in the leaf's
    gradient accumulator (its ``AccumulateGrad`` node), which the leaf reuses for as long as any
    graph still holds it, e.g. a ``loss`` kept from the previous step. ``.data =`` drops that node
    when the dtype or device changes but not when the shape does, so after a resize the next
    backward would reject the new-sized gradient. A resize therefore passes through another dtype,
    which makes the next forward build a fresh accumulator; the hooks live on the tensor and stay.
    (DDP holds the accumulators it found at wrap time: under DDP, d per layer must not change.)
    """
    if values.shape != param.shape:
        param.data = values.new_empty(0, dtype=torch.float64 if values.dtype != torch.float64 else torch.float32)
    param.data = values


class DRTLayer(KernelCache, BaseDRTLayer):
    """Wraps a module and trains only d entries of its weight: the sparse embedding of every selecting method.

    State (survey eq. 7):

    - ``drt_indices`` — ψ: the sorted flat indices (into ``weight.view(-1)``) of the d trained entries;
    - ``drt_values`` — ϑ: the d trained values, the layer's only trainable weight parameter;
    - χ·Θ(0): in ``mode="freeze"`` the untrained entries keep the base weight's values, and the
      base values at ψ are kept in ``drt_base_values`` so :meth:`unload` restores the base exactly;
      in ``mode="prune"`` they are zero and the base weight stays untouched.

    Products (see :mod:`drt_peft.layer.ops`): in freeze mode Θ is the base module's own weight with
    ϑ written in place at ψ before each forward (cost ∝ d), so the forward is a plain dense product.
    In prune mode a Linear or Conv1D layer with 0 < d ≤ :data:`CSR_MAX_DENSITY`·D (float32/64) on a
    device of :data:`CSR_DEVICE_TYPES` keeps Θ as CSR matrices built once per mask and runs its
    forward and input gradient on sparse kernels (:attr:`sparse_kernels`; autograd does not
    differentiate them); other pruned layers keep a dense zero tensor holding ϑ at ψ
    (``drt_effective``; a layer that would use the CSR kernels elsewhere allocates it when it first
    runs dense, and drops it when back on such a device). In every case the gradient of ϑ is the
    weight gradient sampled at ψ; a dense weight gradient is formed only while a method asks for it
    (:attr:`capture_dense_grad`: RigL's update steps, SNFS, FISH re-scoring) or transiently, one
    layer at a time, where a dense product is the faster way to the d values
    (:meth:`~drt_peft.layer.ops.WeightOp.grad_kernel`). A layer with no trained entry (d = 0, e.g.
    norm/bias-only training) runs the plain product under autograd: input and bias gradients only,
    no sampled product. With ``train_bias`` the base bias is kept aside (``drt_base_bias``) so
    :meth:`unload` restores it too.

    Dtypes: the products run in :func:`~drt_peft.layer.ops.compute_dtype`, the weight's dtype or,
    under ``torch.autocast``, autocast's (the input is cast to it, the output has it, as with a
    plain module); the CSR kernels run in the values' dtype with autocast disabled. ϑ may be
    stored in another dtype than the weight (float32 on a half-precision base,
    :meth:`upcast_adapter_tensors`): it is cast to the weight's dtype where it is written into Θ,
    and its gradient is computed (SDDMM in float32) and returned in its own dtype.
    ``drt_base_values`` always has the weight's dtype, so :meth:`unload` is exact.
    """

    def __init__(self, base_layer: nn.Module, indices: Tensor, mode: str, train_bias: bool = False) -> None:
        if mode not in ("freeze", "prune"):
            raise ValueError(f"mode={mode!r} is not supported; use 'freeze' or 'prune'")
        super().__init__(base_layer, indices, train_bias)
        self.mode = mode
        weight = self.base_layer.weight
        self._csr_eligible = (
            mode == "prune"
            and isinstance(self.op, (LinearOp, Conv1DOp))
            and weight.dtype in (torch.float32, torch.float64)
            and 0 < self.drt_indices.numel() <= CSR_MAX_DENSITY * weight.numel()
        )
        if mode == "freeze":
            self.register_buffer("drt_base_values", self.drt_values.detach().clone())
        else:
            dense = torch.zeros_like(weight) if not self.sparse_kernels else weight.new_empty(0)
            self.register_buffer("drt_effective", dense, persistent=False)
        #: When True, the next backwards also form the dense weight gradient into :attr:`dense_grad`.
        self.capture_dense_grad = False
        self.dense_grad: Tensor | None = None
        self._cache: dict[tuple, object] = {}

    @property
    def sparse_kernels(self) -> bool:
        """Whether the forward and input gradient run on CSR kernels: a prune-mode Linear/Conv1D layer of float32/64
        at density ≤ :data:`CSR_MAX_DENSITY`, while its weight is on a device of :data:`CSR_DEVICE_TYPES`."""
        return self._csr_eligible and self.base_layer.weight.device.type in CSR_DEVICE_TYPES

    def _apply(self, fn, recurse: bool = True):
        result = super()._apply(fn, recurse)
        if self.sparse_kernels and self.drt_effective.numel():  # back on a device of the CSR kernels
            self.drt_effective = self.drt_effective.new_empty(0)
        return result

    def _materialised(self) -> Tensor:
        """The dense weight the products use (freeze: the base weight with ϑ written at ψ; dense prune: a zero
        buffer holding ϑ at ψ)."""
        if self.mode == "freeze":
            weight = self.base_layer.weight
        else:
            if not self.drt_effective.numel():  # a layer of the CSR kernels running dense (on CUDA): allocated now
                self.drt_effective = torch.zeros_like(self.base_layer.weight)
            weight = self.drt_effective
        with torch.no_grad():
            weight.view(-1).index_copy_(0, self.drt_indices, self.drt_values.detach().to(weight.dtype))
        return weight

    def effective_weight(self) -> Tensor:
        if not self.sparse_kernels:
            return self._materialised()
        weight = torch.zeros_like(self.base_layer.weight)
        weight.view(-1)[self.drt_indices] = self.drt_values.detach().to(weight.dtype)
        return weight

    def sparse_weight(self) -> tuple[Tensor, Tensor] | None:
        """In prune mode, Θ as ``(ψ, Θ[ψ])``: the values :meth:`merge` writes, which are all of Θ's non-zeros."""
        if self.mode != "prune":
            return None
        weight = self.effective_weight()
        return self.drt_indices, weight.reshape(-1)[self.drt_indices]

    def _product(self):
        if not self.sparse_kernels:
            return DenseProduct(self.op, self._materialised)
        layout = self._cached(("csr", self.drt_indices.device), lambda: CSRLayout(self.op, self.drt_indices))
        return layout.bind(self.drt_values.detach())

    def _frozen_values(self, base: Tensor) -> Tensor:
        """What the frozen entries at Θ(0) = ``base`` hold now: Θ(0) itself (a subclass may scale it)."""
        return base

    def _pattern(self, dtype: torch.dtype) -> Tensor:
        """CSR pattern of ψ for the SDDMM, built once per device and compute dtype."""
        key = ("pattern", self.drt_indices.device, sddmm_dtype(dtype))
        return self._cached(key, lambda: csr_pattern(self.drt_indices, self.op.pattern_shape, key[2]))

    def upcast_adapter_tensors(self) -> None:
        """As :meth:`BaseDRTLayer.upcast_adapter_tensors`; ``drt_base_values`` keeps the weight's dtype, so
        :meth:`unload` is exact, and the kernels built for the old dtype are dropped."""
        super().upcast_adapter_tensors()
        self._cache.clear()

    def _restore_frozen(self) -> None:
        """Write back what the current ψ displaced: Θ(0) at ψ (freeze) or zeros (dense prune buffer)."""
        with torch.no_grad():
            if self.mode == "freeze":
                self.base_layer.weight.view(-1).index_copy_(0, self.drt_indices, self.drt_base_values)
            elif self.drt_effective.numel():
                self.drt_effective.view(-1)[self.drt_indices] = 0

    def suspend(self) -> nn.Module:
        """As :meth:`BaseDRTLayer.suspend`; a dense prune-mode layer also frees its D-sized buffer meanwhile."""
        module = super().suspend()
        if self.mode == "prune" and not self.sparse_kernels:
            self.drt_effective = self.drt_effective.new_empty(0)
        return module

    def resume(self) -> None:
        super().resume()
        if self.mode == "prune" and not self.sparse_kernels:
            self.drt_effective = torch.zeros_like(self.base_layer.weight)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Tensor],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Loading another ψ (a checkpoint, a Trainer resume) first returns the current ψ to χ·Θ(0), resizes the
        tensors shaped like ψ (methods that move d between layers) and drops the kernels built for the old ψ,
        so the effective weight, the sparse kernels and :meth:`merge` follow the loaded mask."""
        incoming = state_dict.get(prefix + "drt_indices")
        if incoming is not None:
            self._restore_frozen()
            if incoming.shape != self.drt_indices.shape:
                for name in ("drt_indices", "drt_base_values"):
                    if name in self._buffers:
                        self._buffers[name] = self._buffers[name].new_empty(incoming.shape)
                _set_values(self.drt_values, self.drt_values.data.new_empty(incoming.shape))
            self.drt_values.grad = None
            self._cache.clear()
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def update_indices(
        self, indices: Tensor, optimizer: torch.optim.Optimizer | None = None, *, fresh: Tensor | None = None
    ) -> None:
        """Move ψ to ``indices`` (sorted, unique; any size) in place, keeping the same ``drt_values`` Parameter.

        Kept entries keep their value and optimizer state. Grown entries start at their current
        frozen value (:meth:`_frozen_values`) in freeze mode and at 0 in prune mode, with zero optimizer state
        (every state tensor shaped like ϑ, e.g. Adam's moments or SGD's momentum, is rebuilt);
        dropped entries return to Θ(0) (freeze) or 0 (prune) and their state is discarded. The
        optimizer is not rebuilt (survey §6; Evci et al. 2020). ``fresh`` (boolean, one per entry
        of ``indices``) marks entries that start afresh like grown ones even if trained now (an
        entry dropped and grown again in one update).

        When d changes, training goes on in the same loop: the Parameter keeps its identity, its
        optimizer state is resized with it, and autograd is made to accept gradients of the new size.
        """
        weight = self.base_layer.weight
        indices = checked_indices(indices, weight)
        old = self.drt_indices
        where = torch.searchsorted(old, indices).clamp(max=max(old.numel() - 1, 0))
        kept = old[where] == indices if old.numel() else torch.zeros_like(indices, dtype=torch.bool)
        if fresh is not None:
            fresh = fresh.to(device=kept.device, dtype=torch.bool)
            if fresh.shape != indices.shape:
                raise ValueError(
                    f"fresh has shape {tuple(fresh.shape)}; it needs one entry per index, {indices.numel()}"
                )
            kept &= ~fresh
        kept_old = torch.zeros_like(old, dtype=torch.bool)
        kept_old[where[kept]] = True
        flat = weight.detach().view(-1)
        with torch.no_grad():
            values = self.drt_values.new_zeros(indices.numel())
            values[kept] = self.drt_values[where[kept]]
            if self.mode == "freeze":
                flat[old[~kept_old]] = self.drt_base_values[~kept_old]
                base = self.drt_base_values.new_empty(indices.numel())
                base[kept] = self.drt_base_values[where[kept]]
                base[~kept] = flat[indices[~kept]]
                values[~kept] = self._frozen_values(base[~kept]).to(values.dtype)
                self.drt_base_values = base
            elif self.drt_effective.numel():
                self.drt_effective.view(-1)[old[~kept_old]] = 0
        if optimizer is not None:
            state = optimizer.state.get(self.drt_values, {})
            for key, tensor in list(state.items()):
                if isinstance(tensor, Tensor) and tensor.shape == self.drt_values.shape:
                    moved = tensor.new_zeros(indices.numel())
                    moved[kept] = tensor[where[kept]]
                    state[key] = moved
        self.drt_values.grad = None
        _set_values(self.drt_values, values)
        self.drt_indices = indices
        self._cache.clear()

    def forward(self, x: Tensor) -> Tensor:
        product = self._product()
        bias = self.base_layer.bias
        dtype = compute_dtype(self.base_layer.weight.dtype, x.device.type)
        if x.dtype != dtype:
            x = x.to(dtype)
        if not torch.is_grad_enabled() or not (self.drt_values.requires_grad or x.requires_grad):
            return product.forward(x, bias)
        if not self.drt_indices.numel() and not self.capture_dense_grad:
            # No trained entry: autograd of the plain product yields the input and bias gradients and,
            # since the weight does not require grad, no weight gradient and no sampled product.
            return product.forward(x, bias)
        sink = self if self.capture_dense_grad else None
        return SampledWeightFunction.apply(x, self.drt_values, bias, product, self.op, self._pattern(dtype), sink)

    def accumulate_dense_grad(self, grad: Tensor) -> None:
        """Add a dense weight gradient to :attr:`dense_grad` (called from the backward when capturing).

        :attr:`dense_grad` has the weight's dtype, as the weight's own ``.grad`` would, also when the
        products ran in autocast's lower precision.
        """
        grad = grad.detach()
        if self.dense_grad is not None:
            self.dense_grad.add_(grad)
        else:
            dtype = self.base_layer.weight.dtype
            self.dense_grad = grad.clone() if grad.dtype == dtype else grad.to(dtype)

    def extra_repr(self) -> str:
        total = self.base_layer.weight.numel()
        kernels = ", sparse_kernels=True" if self.sparse_kernels else ""
        return f"mode={self.mode!r}, trainable={self.num_trainable}/{total} ({self.num_trainable / total:.4%}){kernels}"
