"""Training in a random subspace: Θ = Θ(0) + P·ϑ with a fixed Fastfood projection P (intrinsic dimension).

Li, Farkhoor, Liu & Yosinski, *Measuring the Intrinsic Dimension of Objective Landscapes*, ICLR
2018, §2: θ^(D) = θ_0^(D) + P θ^(d), one vector θ^(d) ∈ R^d for the whole network, P ∈ R^(D×d)
fixed and random. Aghajanyan, Gupta & Zettlemoyer (ACL 2021) apply it to fine-tuning language
models. P is never stored: it is the Fastfood transform (Le, Sarlós & Smola, ICML 2013)

    V = (1/(σ√n)) · S · H · G · Π · H · B        (one n × n block, n = 2^⌈log2 d⌉)

regenerated from the seed. Per layer l, ⌈D_l/n⌉ blocks are stacked, applied to ϑ zero-padded to
n, and the output is truncated to D_l entries and reshaped like the weight:

- B: diagonal of random ±1; Π: a random permutation; G: diagonal of N(0, 1) draws;
- H: the unnormalised Walsh–Hadamard matrix (entries ±1), applied in O(n log n) by :func:`hadamard`;
- σ = 1 and S = √(n/D) / ‖G‖_F · I, with D = Σ_l D_l the size of all targeted weights. Instead of
  Le et al.'s chi-distributed S (which mimics a Gaussian matrix) this is the normalisation Li et
  al. use, ‖G‖_F^{-1}, times √(n/D): each block's columns then have squared norm exactly n/D, so
  the columns of P have unit norm exactly when every D_l is a multiple of n and up to the
  truncation of each layer's last block otherwise. ‖Θ − Θ(0)‖ ≈ ‖ϑ‖ for any D, so one learning
  rate suits models of any size.

Since S is a multiple of the identity it commutes with H and is folded into G's buffer. B, Π
and G are drawn per layer from ``generator(seed, "fastfood", layer name)`` and cached as
non-persistent buffers (O(D_l)); they never enter a checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..seeding import generator
from .base import BaseDRTLayer
from .ops import autocast_forward


def hadamard(x: Tensor) -> Tensor:
    """x·H along the last dimension (length n, a power of two): the unnormalised Walsh–Hadamard transform.

    H is Sylvester's matrix, H_1 = [1], H_2m = [[H_m, H_m], [H_m, −H_m]], i.e. H_ij = (−1)^popcount(i & j)
    (symmetric, H·H = n·I). It is H_2 ⊗ … ⊗ H_2, applied as log2(n) butterfly stages, one per bit of the
    index, each a reshape and one sum and difference: O(n log n), no n × n matrix.
    """
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"the Walsh–Hadamard transform needs a power-of-two length, got {n}")
    lead = x.shape[:-1]
    stride = 1
    while stride < n:
        pairs = x.reshape(*lead, n // (2 * stride), 2, stride)
        low, high = pairs[..., 0, :], pairs[..., 1, :]
        x = torch.stack((low + high, low - high), dim=-2)
        stride *= 2
    return x.reshape(*lead, n)


class ProjectedLayer(BaseDRTLayer):
    """Θ_l = Θ_l(0) + reshape(P_l·ϑ): one global ϑ ∈ R^d shared by every layer (see module docstring).

    The layer has no ψ (``drt_indices`` is empty). ϑ is the ``drt_values`` Parameter of the first
    embedded layer, the *owner*; every other layer has an empty ``drt_values`` and reads ϑ from
    the owner, which it keeps outside the module tree (``_owner``), so ϑ is registered, counted,
    optimised and saved exactly once. :func:`share_projection` wires the layers together once
    every layer is built, since d and P's scale depend on the size D of all targeted weights.

    The forward is the dense product with W = Θ(0) + P_l·ϑ (the base weight stays Θ(0), so
    :meth:`unload` restores it exactly); the gradient reaches ϑ through the transform by
    autograd. Unlike the other DRT layers the weight gradient is dense: every entry of W depends
    on ϑ, so ∂L/∂W is formed in full and projected, Pᵀ·∂L/∂W, in O(D_l log n).
    """

    def __init__(self, base_layer: nn.Module, train_bias: bool = False) -> None:
        super().__init__(base_layer, torch.empty(0, dtype=torch.int64), train_bias)
        self.drt_values.requires_grad_(False)
        self._owner: tuple[ProjectedLayer, ...] = ()

    @property
    def attached(self) -> bool:
        """Whether :func:`share_projection` has given this layer its projection and ϑ."""
        return bool(self._owner)

    @property
    def num_trainable(self) -> int:
        """d on the owner of ϑ, 0 on the other layers, so totals over layers count d once."""
        return self.drt_values.numel()

    @property
    def theta(self) -> Tensor:
        """ϑ, the global trained vector (the owner's ``drt_values``)."""
        if not self._owner:
            raise RuntimeError("this ProjectedLayer has no projection yet; build it with get_drt_model")
        return self._owner[0].drt_values

    def attach(self, owner: ProjectedLayer, seed: int, name: str, n: int, total: int) -> None:
        """Draw this layer's Fastfood blocks for ``n`` = 2^⌈log2 d⌉ and read ϑ from ``owner``.

        ``total`` is D, the size of all targeted weights (it sets S, see the module docstring).
        """
        weight = self.base_layer.weight
        blocks = -(-weight.numel() // n)
        g = generator(seed, "fastfood", name)
        signs = torch.randint(0, 2, (blocks, n), generator=g, dtype=torch.int8).mul_(2).sub_(1)
        permutation = torch.rand(blocks, n, generator=g).argsort(dim=1)
        gauss = torch.randn(blocks, n, generator=g, dtype=torch.float64)
        gauss = gauss / (gauss.norm(dim=1, keepdim=True) * math.sqrt(total))  # G·S/√n = G/(‖G‖_F·√D)
        # Π of every block as positions into the flattened [blocks, n] tensor; int32 halves the buffer
        flat = permutation + torch.arange(0, blocks * n, n).unsqueeze(1)
        index_dtype = torch.int32 if blocks * n < 2**31 else torch.int64
        self.register_buffer("fastfood_signs", signs.to(weight.device), persistent=False)
        self.register_buffer("fastfood_permutation", flat.to(weight.device, index_dtype), persistent=False)
        self.register_buffer("fastfood_gauss", gauss.to(weight.device, weight.dtype), persistent=False)
        self._owner = (owner,)

    def project(self, theta: Tensor) -> Tensor:
        """P_l·``theta`` shaped like the weight: (1/√n)·S·H·G·Π·H·B on ``theta`` zero-padded to n, per block.

        Differentiable in ``theta``; cost O(D_l log n) with buffers of O(D_l).
        """
        blocks, n = self.fastfood_signs.shape
        x = F.pad(theta.to(self.fastfood_gauss.dtype), (0, n - theta.numel()))
        x = hadamard(self.fastfood_signs * x)  # H·B, every block at once: [blocks, n]
        x = x.reshape(-1).index_select(0, self.fastfood_permutation.reshape(-1)).reshape(blocks, n)  # Π
        x = hadamard(self.fastfood_gauss * x)  # H·G, with S/√n folded into G
        return x.reshape(-1)[: self.base_layer.weight.numel()].reshape(self.weight_shape)

    def effective_weight(self) -> Tensor:
        """Θ(0) + P_l·ϑ, detached."""
        with torch.no_grad():
            return self.base_layer.weight + self.project(self.theta)

    def get_mask(self) -> Tensor:
        """All True: through P every entry of the weight moves with ϑ."""
        return torch.ones(self.weight_shape, dtype=torch.bool, device=self.base_layer.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.base_layer.weight
        return autocast_forward(self.op, x, weight + self.project(self.theta), self.base_layer.bias)

    def extra_repr(self) -> str:
        if not self.attached:
            return "unattached"
        blocks, n = self.fastfood_signs.shape
        return f"d={self.theta.numel()} (shared), fastfood={blocks}×{n}, owner={self._owner[0] is self}"


def share_projection(layers: Sequence[tuple[str, ProjectedLayer]], d: int, seed: int) -> None:
    """Create ϑ = 0 ∈ R^d on the first layer and give every layer its Fastfood blocks from ``seed``.

    Does nothing when the layers are already attached (a model built before, or training resuming).
    """
    if not layers or layers[0][1].attached:
        return
    owner = layers[0][1]
    owner.drt_values = nn.Parameter(owner.drt_values.new_zeros(d))  # ϑ keeps the dtype chosen for the values
    n = 1 << (d - 1).bit_length()
    total = sum(layer.base_layer.weight.numel() for _, layer in layers)
    for name, layer in layers:
        layer.attach(owner, seed, name, n, total)
