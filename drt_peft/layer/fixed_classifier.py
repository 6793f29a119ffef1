"""A fixed classifier: y = α·W·x with W a seeded random orthogonal matrix and α the only trained scalar.

Hoffer, Hubara & Soudry, *Fix your classifier: the marginal value of training the last weight
layer*, ICLR 2018: the last layer is fixed up to a global scale constant, a learned temperature
α. W is regenerated from the seed and never stored:

    G ~ N(0, 1) of shape max(out, in) × min(out, in),   G = Q·R (reduced QR),   Q ← Q·sign(diag R)

W = Qᵀ (``out × in``, orthonormal rows, W·Wᵀ = I_out) when out ≤ in, and W = Q (orthonormal
columns, Wᵀ·W = I_in) when out > in. The sign correction makes Q unique, so W is a function of
the Gaussian draw alone (and Haar-distributed). Drawn in float64 on a CPU generator seeded by
``(seed, "fixed_classifier", layer name)``, then cast to the weight's dtype and device.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..seeding import generator
from .base import BaseDRTLayer
from .ops import autocast_forward


def random_orthogonal(rows: int, cols: int, g: torch.Generator) -> Tensor:
    """A ``rows × cols`` float64 matrix with orthonormal rows (rows ≤ cols) or columns (rows > cols)."""
    q, r = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols), generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return q.t().contiguous() if rows <= cols else q


class FixedClassifierLayer(BaseDRTLayer):
    """y = α·W·x (+ b): a fixed random orthogonal weight W and one trainable temperature α.

    ψ is empty (no entry of the base weight trains; ``drt_values`` is empty and frozen). W lives in
    the non-persistent buffer ``fixed_weight`` (the base weight's layout; orthogonality holds in
    the ``[out, fan_in]`` view) and is drawn by :meth:`draw_fixed_weight` once the layer's name is
    known; the base weight is never read nor modified, so :meth:`unload` gives the head back
    exactly. ``temperature`` (α, a float32 scalar Parameter) is the only trained tensor and is
    stored in the adapter (:meth:`adapter_tensors`). With ``train_bias`` the base bias is added and
    trains; without it the layer has no bias term. The gradient reaches α and the input by
    autograd; no weight gradient is formed.
    """

    def __init__(self, base_layer: nn.Module, train_bias: bool = False, temperature: float = 1.0) -> None:
        super().__init__(base_layer, torch.empty(0, dtype=torch.int64), train_bias)
        self.drt_values.requires_grad_(False)
        self.adds_bias = train_bias and base_layer.bias is not None
        self.temperature = nn.Parameter(
            torch.tensor(float(temperature), dtype=torch.float32, device=base_layer.weight.device)
        )

    @property
    def attached(self) -> bool:
        """Whether :meth:`draw_fixed_weight` has given this layer its W."""
        return hasattr(self, "fixed_weight")

    def draw_fixed_weight(self, seed: int, name: str) -> None:
        """Draw W from ``(seed, "fixed_classifier", name)`` (see module docstring); kept if already drawn."""
        if self.attached:
            return
        weight = self.base_layer.weight
        rows, cols = self.op.to_matrix(weight).shape
        matrix = random_orthogonal(rows, cols, generator(seed, "fixed_classifier", name))
        fixed = self.op.from_matrix(matrix).to(weight.device, weight.dtype).contiguous()
        self.register_buffer("fixed_weight", fixed, persistent=False)

    def _fixed(self) -> Tensor:
        if not self.attached:
            raise RuntimeError("this FixedClassifierLayer has no fixed weight yet; build it with get_drt_model")
        return self.fixed_weight

    def effective_weight(self) -> Tensor:
        """α·W in the weight's layout, detached."""
        return (self._fixed() * self.temperature.detach()).to(self.base_layer.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        out = autocast_forward(self.op, x, self._fixed(), None)
        # α scales in at least float32: its gradient, one sum over the whole output, loses digits in half precision
        scale_dtype = torch.promote_types(out.dtype, self.temperature.dtype)
        out = (out.to(scale_dtype) * self.temperature.to(scale_dtype)).to(out.dtype)
        return self.op.add_bias(out, self.base_layer.bias.to(out.dtype)) if self.adds_bias else out

    def adapter_tensors(self) -> dict[str, Tensor]:
        """α; W is regenerated from the seed."""
        return {"temperature": self.temperature.detach()}

    def load_adapter_tensors(self, tensors: dict[str, Tensor]) -> None:
        if set(tensors) != {"temperature"}:
            raise ValueError(f"FixedClassifierLayer stores exactly ['temperature'], got {sorted(tensors)}")
        with torch.no_grad():
            self.temperature.copy_(tensors["temperature"].reshape(()))

    def merge(self) -> nn.Module:
        """The base module with weight α·W (and, without a trained bias, a zero bias): the same function."""
        base = self.base_layer
        with torch.no_grad():
            base.weight.copy_(self.effective_weight())
            if base.bias is not None and not self.adds_bias:
                base.bias.zero_()
        return base

    def extra_repr(self) -> str:
        rows, cols = self.op.to_matrix(self.base_layer.weight).shape
        alpha = float(self.temperature.detach())
        state = "" if self.attached else ", unattached"
        bias = "trained" if self.adds_bias else "none"
        return f"fixed orthogonal {rows}×{cols}, temperature={alpha:.4g}, bias={bias}{state}"
