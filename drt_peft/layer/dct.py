"""DCT plus sparse: y = S·x + α·C·x + b with a trained sparse S, a fixed orthonormal DCT path C and a trained scalar α.

Price & Tanner, *Dense for the Price of Sparse: Improved Performance of Sparsely Initialized
Networks via a Subspace Offset*, ICML 2021: the layer's matrix is the sum of a sparse trainable
matrix and a fixed DCT, applied by a fast transform, so the layer is dense at the cost of a
sparse one plus O(n log n). As in the authors' code, the DCT path is scaled by one trainable
scalar per layer, initialised to 1; nothing else is added to train or store.

C is the leading ``out × in`` block of the orthonormal DCT-II matrix of size N = max(in, out),

    C_kj = s_k · cos(π (2j + 1) k / (2N)),   s_0 = √(1/N),  s_k = √(2/N) for k ≥ 1,

i.e. for ``out ≤ in`` the first ``out`` coefficients of the orthonormal DCT of x, and for
``out > in`` the orthonormal DCT of x zero-padded to length ``out``. C is a partial isometry:
C·Cᵀ = I_out when out ≤ in (orthonormal rows), Cᵀ·C = I_in when out ≥ in (orthonormal columns);
a square C is orthogonal.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layer import DRTLayer
from .ops import Conv1DOp, LinearOp, weight_op


def dct_ii(x: Tensor) -> Tensor:
    """The orthonormal DCT-II of ``x`` along its last dimension, with one FFT of the same length.

    Makhoul's reordering (IEEE Trans. ASSP 1980): v = (x_0, x_2, x_4, …, x_5, x_3, x_1), then
    Σ_j x_j cos(π(2j+1)k/(2N)) = Re(e^{−iπk/(2N)} · FFT(v)_k). Half-precision inputs compute in
    float32. O(N log N) per vector.
    """
    dtype = x.dtype
    if dtype not in (torch.float32, torch.float64):
        x = x.float()
    n = x.shape[-1]
    spectrum = torch.fft.fft(torch.cat((x[..., ::2], x[..., 1::2].flip(-1)), dim=-1), dim=-1)
    angle = torch.arange(n, dtype=x.dtype, device=x.device) * (math.pi / (2 * n))
    scale = torch.full((n,), math.sqrt(2 / n), dtype=x.dtype, device=x.device)
    scale[0] = math.sqrt(1 / n)
    coefficients = spectrum.real * torch.cos(angle) + spectrum.imag * torch.sin(angle)
    return (coefficients * scale).to(dtype)


def partial_dct(x: Tensor, size: int) -> Tensor:
    """C·x along the last dimension for C the leading ``size × in`` block of the DCT of size max(in, size)."""
    if size > x.shape[-1]:
        x = F.pad(x, (0, size - x.shape[-1]))
    return dct_ii(x)[..., :size]


class DCTSparseLayer(DRTLayer):
    """y = S·x + α·C·x + b: the pruned DRT layer (S = ψ·ϑ, zero elsewhere) plus the scaled DCT path α·C.

    S trains exactly as in :class:`DRTLayer` with ``mode="prune"`` (sampled weight gradient, CSR
    kernels at low density); C (see module docstring) has no parameters and no buffers and is
    applied with :func:`partial_dct` in O(N log N) per input vector, no ``out × in`` matrix. α
    (``dct_scale``, a float32 scalar Parameter initialised to 1, as in the authors' code) trains by
    autograd and is stored in the adapter (:meth:`adapter_tensors`; adapters saved without it load
    with α = 1). The input gradient flows through both paths. :meth:`merge` forms C once and writes
    S + α·C into the weight, so the merged module computes the same function. Supports ``nn.Linear``
    and transformers' ``Conv1D`` (whose ``[in, out]`` weight gets Cᵀ).
    """

    def __init__(self, base_layer: nn.Module, indices: Tensor, train_bias: bool = False) -> None:
        if not isinstance(weight_op(base_layer), (LinearOp, Conv1DOp)):
            raise TypeError(
                f"cannot embed a {type(base_layer).__name__} with a DCT path; dct_sparse supports nn.Linear "
                "and transformers' Conv1D (leave other modules out of target_modules)"
            )
        super().__init__(base_layer, indices, "prune", train_bias)
        self.out_features, self.in_features = self.op.to_matrix(base_layer.weight).shape
        self.dct_scale = nn.Parameter(torch.tensor(1.0, dtype=torch.float32, device=base_layer.weight.device))

    def dct_matrix(self) -> Tensor:
        """C as an explicit ``[out, in]`` matrix (the path applied to the unit vectors), for merging."""
        weight = self.base_layer.weight
        eye = torch.eye(self.in_features, dtype=weight.dtype, device=weight.device)
        return partial_dct(eye, self.out_features).t()

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        dct = partial_dct(x, self.out_features)
        # α scales in at least float32: its gradient, one sum over the whole output, loses digits in half precision
        scale_dtype = torch.promote_types(dct.dtype, self.dct_scale.dtype)
        return out + (dct.to(scale_dtype) * self.dct_scale.to(scale_dtype)).to(out.dtype)

    def merge(self) -> nn.Module:
        """The base module with weight S + α·C (in the weight's own layout)."""
        base = super().merge()
        with torch.no_grad():
            scaled = self.dct_matrix() * self.dct_scale.detach().to(base.weight.dtype)
            base.weight.add_(self.op.from_matrix(scaled))
        return base

    def sparse_weight(self) -> None:
        """None: the merged weight S + α·C is dense."""
        return None

    def adapter_tensors(self) -> dict[str, Tensor]:
        """α; C is regenerated from the layer's shape."""
        return {"dct_scale": self.dct_scale.detach()}

    def load_adapter_tensors(self, tensors: dict[str, Tensor]) -> None:
        if set(tensors) - {"dct_scale"}:
            raise ValueError(f"DCTSparseLayer stores only ['dct_scale'], got {sorted(tensors)}")
        value = tensors.get("dct_scale", torch.tensor(1.0))  # adapters saved before α trained have none: α = 1
        with torch.no_grad():
            self.dct_scale.copy_(value.reshape(()))

    def extra_repr(self) -> str:
        scale = float(self.dct_scale.detach())
        return f"{super().extra_repr()}, dct={self.out_features}×{self.in_features}, dct_scale={scale:.4g}"
