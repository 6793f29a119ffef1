"""DCT plus sparse (Price & Tanner 2021): a sparse trained matrix offset by a fixed orthonormal DCT."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..config import DRTConfig, Paper, register_method
from ..layer.dct import DCTSparseLayer
from ..masks.criteria.basic import random_scores
from ..policy import Policy

if TYPE_CHECKING:
    from torch import Tensor, nn


class DCTSparsePolicy(Policy):
    """Layers with a fixed DCT path beside the sparse trained matrix."""

    def build_layer(self, module: nn.Module, indices: Tensor) -> DCTSparseLayer:
        """A :class:`~drt_peft.layer.dct.DCTSparseLayer` with S trained at ψ = ``indices``."""
        return DCTSparseLayer(module, indices, self.config.bias == "all")


@register_method("dct_sparse")
@dataclass(frozen=True)
class DCTSparseConfig(DRTConfig):
    """y = S·x + C·x + b: S = ψ·ϑ sparse and trained, C a fixed orthonormal DCT-II path.

    Price & Tanner, *Dense for the Price of Sparse: Improved Performance of Sparsely Initialized
    Networks via a Subspace Offset* (ICML 2021): each layer's matrix is S + C, with S a sparse
    trainable matrix and C the DCT applied by a fast transform, O(n log n), so a sparse layer
    acts like a dense one without extra parameters. Non-square layers use the leading out × in
    block of the orthonormal DCT of size max(in, out) (see :mod:`drt_peft.layer.dct`).

    S is the prune-mode embedding: ψ is chosen at random per layer from ``(seed, layer name)``
    as in :class:`~drt_peft.RandomConfig`, ϑ starts at Θ(0) on ψ and the other entries are zero.
    The checkpoint therefore holds ϑ and the seed; C is regenerated from the layer shape. Meant
    for sparse training from an initialisation, e.g. ``base_init="seeded"``; targets
    ``nn.Linear`` and transformers' ``Conv1D`` layers.

    Example::

        config = DCTSparseConfig(density=0.05, base_init="seeded", modules_to_save=["classifier"])
        model = get_drt_model(base_model, config)
    """

    paper = Paper(
        "Price & Tanner",
        "Dense for the Price of Sparse: Improved Performance of Sparsely Initialized Networks via a Subspace Offset",
        "ICML",
        2021,
    )

    criterion = random_scores
    indices_from_seed = True

    policy = DCTSparsePolicy

    mode: str = field(
        default="prune",
        metadata={"help": "Must be 'prune': S is zero off ψ, and the DCT path supplies the dense part."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode != "prune":
            raise ValueError(
                f"mode={self.mode!r} is not supported by 'dct_sparse'; use 'prune' (S is zero off ψ and the "
                "fixed DCT path is the dense offset)"
            )
