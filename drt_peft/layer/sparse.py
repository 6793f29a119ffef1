"""Pruned layers for inference that store only their kept weights: ``DRTModel.merge_and_unload(sparse=...)``.

A prune-mode layer's Θ is zero outside ψ (survey §2.2: the untrained entries χ·Θ(0) are pruned), so once
trained it can be stored, and multiplied, as its d kept entries alone. The modules here compute
y = x Mᵀ + b for the ``[out, fan_in]`` matrix view M of Θ (``nn.Linear``'s weight; the transpose of
transformers' ``Conv1D`` weight), in one of three layouts:

- ``"csr"``, :class:`CSRLinear`: M in compressed sparse rows (values, int32 column indices, int32 row
  offsets); any mask.
- ``"condensed"``, :class:`CondensedLinear`: constant fan-in, every output keeps the same number k of
  inputs, as an N:M mask at density N/M does: values and input indices as ``[out, k]`` matrices, no row
  offsets (the condensed layer of SRigL, Lasby et al. 2023, *Dynamic Sparse Training with Structured
  Sparsity*).
- ``"semi-structured"``, :class:`SemiStructuredLinear`: 2:4 masks on a CUDA GPU of compute capability
  ≥ 8.0 in float16/bfloat16, through PyTorch's semi-structured sparse tensors
  (``torch.sparse.to_sparse_semi_structured``); stored like ``"condensed"``.

Kernels. The CPU kernels were chosen by design-time measurements (one thread on a shared 2-core machine,
same-process ratios to ``nn.Linear``; ``benchmarks/layer_kernels.py`` measures the result) and are picked per
call from the number of input rows n (batch × sequence) and the density ρ = d/D:

1. n ≥ :data:`_DENSE_MIN_ROWS` on CPU in float32/float64 at ρ ≤ :data:`_TILED_MAX_DENSITY`: the tiled SpMM
   of :mod:`drt_peft.layer.cpu_kernels`, the kernel of pruned layers in training (at 4,096 rows of MiniLM's FFN
   shapes on an idle machine: 1.9× dense at ρ = 0.1 and 5× at ρ = 0.01 on one thread, 1.0× and 2.6× on two,
   where ``embedding_bag`` ran at 0.4–0.8×). Denser layers (2:4 ran at 0.3× dense there), other devices and
   dtypes, with n·ρ² ≥ :data:`_DENSE_WORK` as well: M is scattered into a transient dense matrix for one dense
   product. At thousands of rows a dense GEMM runs near the machine's peak while sparse kernels do not, and
   forming M costs a few dense matrix-vector products, which only a product of a thousand rows or more makes
   small.
2. On CPU in float32/float64 with n ≤ :data:`_MKL_MAX_ROWS`: MKL's CSR kernels, ``addmv`` for one row and
   ``addmm`` above. Their int32-index versions are what make one row fast: ``addmv`` at ρ = 0.1 ran 4.7–5.3×
   a dense 768 → 3072 layer with int32 indices and 2.0× with int64 ones.
3. Otherwise ``embedding_bag`` in sum mode with per-sample weights: bag i adds row i's kept entries times the
   rows of xᵀ at their columns, a CSR product that reads xᵀ's rows contiguously, on any dtype and device. From
   about 64 rows it beat MKL's ``addmm`` by 5–20%; below it lost by up to 2× (and at one row ran at 0.6× dense).

The gather formulation of the condensed layer, ``(x[..., indices] * values).sum(-1)`` (or ``einsum``/``bmm`` on
the gathered inputs), reached 1.5× dense at one row and 0.03× at 64 rows (it materialises a ``[rows, out, k]``
tensor), so the condensed layout runs the same kernels as CSR on its ``[out, k]`` tensors viewed flat; what it
adds is a layout that states the structure and needs no row offsets. A padded condensed layout for uneven rows
is not needed: ``embedding_bag``'s offsets handle uneven rows at the cost of even ones.

The CSR and ``embedding_bag`` paths on CUDA and the semi-structured path have not run (no GPU was available
when they were written): they follow PyTorch's documented APIs, and the semi-structured one refuses anything
outside its documented conditions when the module is built.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..validation import check_choice
from .base import BaseDRTLayer
from .cpu_kernels import tiled_spmm
from .ops import (
    Conv1DOp,
    KernelCache,
    LinearOp,
    compute_dtype,
    csr_structure,
    csr_tensor,
    matrix_positions,
    no_autocast,
)

#: What ``merge_and_unload(sparse=...)`` accepts: a layout, or ``"auto"`` to choose per layer (:func:`auto_layout`).
SPARSE_CHOICES = ("auto", "csr", "condensed", "semi-structured")
#: ``"auto"`` keeps a pruned layer sparse up to this density and merges it densely above: on CPU at ρ = 0.2 the
#: sparse kernels still beat dense up to 64 rows (1.1–2.3×) and lost from a few hundred, at ρ = 0.3 they were
#: about even at best, and at ρ = 0.5 (2:4) they lost at every row count.
AUTO_MAX_DENSITY = 0.2
#: Rows up to which the MKL CSR kernels run (CPU, float32/float64); ``embedding_bag`` above.
_MKL_MAX_ROWS = 32
#: n·ρ² from which a product densifies M (kernel 1 of the module docstring): 1,000 rows at ρ = 0.1, 4,000 at
#: ρ = 0.05, the crossovers measured for MiniLM- and BERT-base-sized layers ...
_DENSE_WORK = 10.0
#: ... and never below this many rows, where forming M would cost as much as the dense product itself (a
#: 2:4 MiniLM ran at a quarter of the dense model's speed at 64 rows when ρ = 0.5 alone decided).
_DENSE_MIN_ROWS = 1024
#: Densities up to which CPU products of that many rows run on the tiled SpMM (1.0–1.9× dense at ρ = 0.1,
#: 0.3× at ρ = 0.5 in ``benchmarks/pruned_inference.py``'s MiniLM).
_TILED_MAX_DENSITY = 0.2
_MKL_DTYPES = (torch.float32, torch.float64)
_SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)


def _index_dtype(count: int) -> torch.dtype:
    """int32 (what MKL's fast kernels take) unless an index can exceed it."""
    return torch.int32 if count < 2**31 else torch.int64


class SparseLinear(KernelCache, nn.Module):
    """y = x Mᵀ + b, M ``[out_features, in_features]`` stored as its kept entries (see the module docstring).

    ``values`` and ``bias`` are Parameters that do not require grad (they count in ``num_parameters()`` and
    follow ``model.to(dtype)``); the index tensors are buffers. The products compute in the values' dtype
    with autocast disabled and return :func:`~drt_peft.layer.ops.compute_dtype`'s dtype, as a plain
    ``nn.Linear`` would under ``torch.autocast``. For inference: no gradient reaches the values.
    """

    layout: ClassVar[str]
    #: The buffers holding input indices (stored as int16 by :func:`drt_peft.save_sparse_model` where they fit).
    index_names: ClassVar[tuple[str, ...]]

    def __init__(self, in_features: int, out_features: int, values: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        #: d/D, the share of M's entries stored.
        self.density = values.numel() / max(1, in_features * out_features)
        self.values = nn.Parameter(values, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._cache: dict[tuple, Any] = {}

    @classmethod
    def from_csr(cls, crow: Tensor, col: Tensor, values: Tensor, in_features: int, bias: Tensor | None) -> SparseLinear:
        """The module of M given as CSR parts (int64 ``crow``/``col``, values in row-major order)."""
        raise NotImplementedError

    @classmethod
    def empty(cls, in_features: int, out_features: int, nnz: int, bias: bool, dtype: torch.dtype) -> SparseLinear:
        """A module of this shape with zero tensors, for :meth:`load_state_dict` to fill."""
        raise NotImplementedError

    def _structure(self) -> tuple[Tensor, Tensor]:
        """``(crow, col)`` of M, int32 (int64 beyond 2³¹ entries), views of the module's buffers where possible."""
        raise NotImplementedError

    @property
    def nnz(self) -> int:
        """d: the number of stored entries."""
        return self.values.numel()

    def _csr(self) -> Tensor:
        return self._cached(
            ("csr",), lambda: csr_tensor(*self._structure(), self.values.detach().reshape(-1), self.shape)
        )

    @property
    def shape(self) -> tuple[int, int]:
        """M's shape, ``(out_features, in_features)``."""
        return self.out_features, self.in_features

    def to_dense(self) -> Tensor:
        """M as a dense ``[out_features, in_features]`` tensor."""
        return self._csr().to_dense()

    def forward(self, x: Tensor) -> Tensor:
        # At batch 1 the product takes tens of microseconds: no operation here that the input does not need.
        values_dtype = self.values.dtype
        dtype = compute_dtype(values_dtype, x.device.type)
        rows = x.reshape(-1, self.in_features)
        if rows.dtype != values_dtype:
            rows = rows.to(values_dtype)
        with no_autocast(x.device.type):
            out = self._product(rows)
        if out.dtype != dtype:
            out = out.to(dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _product(self, x: Tensor) -> Tensor:
        """``x [rows, in]`` → ``x Mᵀ + b``, contiguous ``[rows, out]`` (or ``[out]`` for one row), by the kernel
        the module docstring's rule picks."""
        rows, bias = x.shape[0], self.bias
        on_cpu = x.device.type == "cpu" and x.dtype in _MKL_DTYPES
        if rows >= _DENSE_MIN_ROWS and on_cpu and self.density <= _TILED_MAX_DENSITY:
            crow, col = self._structure()
            out = tiled_spmm(crow, col, self.values.reshape(-1), x)
            return out if bias is None else out.add_(bias)
        if rows >= _DENSE_MIN_ROWS and rows * self.density**2 >= _DENSE_WORK:
            return F.linear(x, self.to_dense(), bias)
        if rows <= _MKL_MAX_ROWS and on_cpu:
            csr = self._csr()
            if rows == 1:
                return torch.mv(csr, x[0]) if bias is None else torch.addmv(bias, csr, x[0])
            out = csr @ x.t() if bias is None else torch.addmm(bias[:, None], csr, x.t())
            return out.t().contiguous()
        crow, col = self._structure()
        weights = self.values.reshape(-1)
        out = F.embedding_bag(col, x.t().contiguous(), crow[:-1], mode="sum", per_sample_weights=weights).t()
        return (out if bias is None else out + bias).contiguous()

    def describe(self) -> dict[str, Any]:
        """What :func:`empty_sparse_module` rebuilds the module from (JSON): layout, sizes, bias, dtype."""
        return {
            "layout": self.layout,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "nnz": self.nnz,
            "bias": self.bias is not None,
            "dtype": str(self.values.dtype).removeprefix("torch."),
        }

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._cache.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, layout={self.layout!r}, "
            f"nnz={self.nnz} ({self.density:.2%}), bias={self.bias is not None}"
        )


class CSRLinear(SparseLinear):
    """M in compressed sparse rows: ``values [nnz]``, ``col_indices [nnz]``, ``crow_indices [out + 1]``; any mask."""

    layout = "csr"
    index_names = ("col_indices",)

    def __init__(
        self, in_features: int, crow_indices: Tensor, col_indices: Tensor, values: Tensor, bias: Tensor | None
    ) -> None:
        super().__init__(in_features, crow_indices.numel() - 1, values, bias)
        self.register_buffer("crow_indices", crow_indices)
        self.register_buffer("col_indices", col_indices)

    @classmethod
    def from_csr(cls, crow: Tensor, col: Tensor, values: Tensor, in_features: int, bias: Tensor | None) -> CSRLinear:
        index = _index_dtype(values.numel())
        return cls(in_features, crow.to(index), col.to(index), values, bias)

    @classmethod
    def empty(cls, in_features: int, out_features: int, nnz: int, bias: bool, dtype: torch.dtype) -> CSRLinear:
        index = _index_dtype(nnz)
        return cls(
            in_features,
            torch.zeros(out_features + 1, dtype=index),
            torch.zeros(nnz, dtype=index),
            torch.zeros(nnz, dtype=dtype),
            torch.zeros(out_features, dtype=dtype) if bias else None,
        )

    def _structure(self) -> tuple[Tensor, Tensor]:
        return self.crow_indices, self.col_indices


class CondensedLinear(SparseLinear):
    """Constant fan-in: ``values [out, k]`` and sorted input ``indices [out, k]``, k kept inputs per output."""

    layout = "condensed"
    index_names = ("indices",)

    def __init__(self, in_features: int, indices: Tensor, values: Tensor, bias: Tensor | None) -> None:
        super().__init__(in_features, indices.shape[0], values, bias)
        self.register_buffer("indices", indices)

    @classmethod
    def from_csr(
        cls, crow: Tensor, col: Tensor, values: Tensor, in_features: int, bias: Tensor | None
    ) -> CondensedLinear:
        counts = crow.diff()
        if counts.numel() and not bool((counts == counts[0]).all()):
            raise ValueError(
                f"sparse={cls.layout!r} needs the same number of kept inputs in every output (an N:M mask at "
                f"density N/M); this layer keeps {int(counts.min())}–{int(counts.max())}: use 'csr' or 'auto'"
            )
        k = int(counts[0]) if counts.numel() else 0
        rows = counts.numel()
        index = _index_dtype(values.numel())
        return cls(in_features, col.to(index).reshape(rows, k), values.reshape(rows, k), bias)

    @classmethod
    def empty(cls, in_features: int, out_features: int, nnz: int, bias: bool, dtype: torch.dtype) -> CondensedLinear:
        if out_features and nnz % out_features:
            raise ValueError(f"nnz={nnz} is not a multiple of out_features={out_features}: not a condensed layout")
        k = nnz // out_features if out_features else 0
        index = _index_dtype(nnz)
        return cls(
            in_features,
            torch.zeros(out_features, k, dtype=index),
            torch.zeros(out_features, k, dtype=dtype),
            torch.zeros(out_features, dtype=dtype) if bias else None,
        )

    def _structure(self) -> tuple[Tensor, Tensor]:
        def build() -> tuple[Tensor, Tensor]:
            rows, k = self.indices.shape
            crow = torch.arange(rows + 1, dtype=self.indices.dtype, device=self.indices.device) * k
            return crow, self.indices.reshape(-1)

        return self._cached(("structure",), build)


def _semi_structured_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why PyTorch's semi-structured sparse tensors cannot hold a weight on ``device`` in ``dtype``, or None."""
    if device.type != "cuda":
        return f"it runs on CUDA GPUs only, and this layer is on {device.type!r}"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return f"it needs compute capability 8.0 or higher, and {torch.cuda.get_device_name(device)} has less"
    if dtype not in _SEMI_STRUCTURED_DTYPES:
        return f"it takes float16 or bfloat16 weights, and this layer is {dtype} (convert the model first)"
    return None


def _is_two_four(counts: Tensor, col: Tensor, in_features: int) -> bool:
    """Whether every block of 4 consecutive inputs of every output keeps exactly 2 (counts, col: CSR, sorted)."""
    if in_features % 4 or not bool((counts == in_features // 2).all()):
        return False
    block = torch.arange(in_features // 2, device=col.device) // 2
    return bool((col.reshape(-1, in_features // 2) // 4 == block).all())


class SemiStructuredLinear(CondensedLinear):
    """A 2:4 ``CondensedLinear`` that runs on CUDA through ``torch.sparse.to_sparse_semi_structured``.

    Not run yet: no GPU was available when it was written (tests cover its refusals). It is built only on a
    CUDA device of compute capability ≥ 8.0 in float16/bfloat16 and from a 2:4 mask (exactly 2 kept in every
    block of 4 inputs), and builds its semi-structured weight then, so PyTorch's own shape conditions fail
    there. It stores the condensed tensors; loaded on another device it computes with the condensed kernels.
    """

    layout = "semi-structured"

    @classmethod
    def from_csr(
        cls, crow: Tensor, col: Tensor, values: Tensor, in_features: int, bias: Tensor | None
    ) -> SemiStructuredLinear:
        if not _is_two_four(crow.diff(), col, in_features):
            raise ValueError(
                f"sparse={cls.layout!r} needs a 2:4 mask (exactly 2 kept in every block of 4 inputs: "
                "structure='2:4' at density 0.5); use 'csr', 'condensed' or 'auto'"
            )
        reason = _semi_structured_unavailable(values.device, values.dtype)
        if reason is not None:
            raise ValueError(f"sparse={cls.layout!r} is not available: {reason}")
        module = super().from_csr(crow, col, values, in_features, bias)
        module._semi_structured()
        return module

    def _semi_structured(self) -> Tensor:
        from torch.sparse import to_sparse_semi_structured

        return self._cached(("semi-structured",), lambda: to_sparse_semi_structured(self.to_dense()))

    def _product(self, x: Tensor) -> Tensor:
        if x.device.type != "cuda":
            return super()._product(x)
        return F.linear(x, self._semi_structured(), self.bias)


#: Layout name → module class.
SPARSE_MODULES: dict[str, type[SparseLinear]] = {
    cls.layout: cls for cls in (CSRLinear, CondensedLinear, SemiStructuredLinear)
}


def auto_layout(crow: Tensor, col: Tensor, values: Tensor, in_features: int) -> str | None:
    """The layout ``sparse="auto"`` gives a pruned layer with CSR parts ``crow``, ``col``, or None to merge it densely.

    1. On a GPU where semi-structured tensors work (:func:`_semi_structured_unavailable`) and the mask is 2:4:
       ``"semi-structured"``.
    2. Density above :data:`AUTO_MAX_DENSITY`, or a device other than the CPU (the other kernels have been
       measured on CPU only): dense.
    3. The same number of kept inputs in every output: ``"condensed"``; otherwise ``"csr"``.
    """
    counts = crow.diff()
    if _semi_structured_unavailable(values.device, values.dtype) is None and _is_two_four(counts, col, in_features):
        return "semi-structured"
    if values.numel() > AUTO_MAX_DENSITY * counts.numel() * in_features or values.device.type != "cpu":
        return None
    return "condensed" if counts.numel() and bool((counts == counts[0]).all()) else "csr"


def sparse_modules(layers: Iterable[tuple[str, BaseDRTLayer]], sparse: str) -> dict[str, SparseLinear]:
    """The modules that replace the pruned layers among ``layers`` for ``merge_and_unload(sparse=sparse)``, by name.

    A layer whose Θ is zero outside ψ (:meth:`~drt_peft.layer.BaseDRTLayer.sparse_weight`: prune mode) and whose
    module is an ``nn.Linear`` or a ``Conv1D`` gets the layout ``sparse`` (or :func:`auto_layout`'s); the others
    (freeze mode, DCT + sparse, ``Conv2d``) are left out, to be merged densely. Everything is built before the
    caller changes anything, so a layer that cannot take the layout fails the call with the model untouched.
    """
    check_choice("sparse", sparse, SPARSE_CHOICES)
    modules: dict[str, SparseLinear] = {}
    pruned = 0
    for name, layer in layers:
        entries = layer.sparse_weight() if isinstance(layer.op, (LinearOp, Conv1DOp)) else None
        if entries is None:
            continue
        pruned += 1
        positions, (rows, in_features) = matrix_positions(layer.op, entries[0])
        order = torch.argsort(positions)
        crow, col = csr_structure(positions[order], (rows, in_features))
        values = entries[1][order]
        bias = None if layer.base_layer.bias is None else layer.base_layer.bias.detach()
        layout = sparse if sparse != "auto" else auto_layout(crow, col, values, in_features)
        if layout is None:
            continue
        try:
            modules[name] = SPARSE_MODULES[layout].from_csr(crow, col, values, in_features, bias)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
    if not pruned:
        raise ValueError(
            f"sparse={sparse!r}: no layer of this adapter is a pruned nn.Linear or Conv1D (mode='prune'); freeze-mode "
            "layers keep Θ(0) at their untrained entries, so their weights are dense, as are DCT + sparse and "
            "Conv2d layers: call merge_and_unload() without sparse"
        )
    return modules


def empty_sparse_module(description: dict[str, Any]) -> SparseLinear:
    """The module :meth:`SparseLinear.describe` described, with zero tensors, for ``load_state_dict`` to fill."""
    try:
        layout = description["layout"]
        check_choice("layout", layout, list(SPARSE_MODULES))
        sizes = [description[key] for key in ("in_features", "out_features", "nnz")]
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in sizes):
            raise ValueError(f"in_features, out_features and nnz must be integers >= 0, got {sizes}")
        dtype = getattr(torch, str(description["dtype"]), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype={description['dtype']!r} is not a floating-point torch dtype")
        return SPARSE_MODULES[layout].empty(*sizes, bool(description["bias"]), dtype)
    except KeyError as err:
        raise ValueError(f"the description {description} has no {err}") from None
