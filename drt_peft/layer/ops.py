"""The compact forward/backward of one embedded weight, per module type.

Training a DRT layer needs three products per step (survey §2.3):

- the forward with the effective weight Θ = ψ·ϑ + χ·Θ(0), a plain dense product because Θ is
  kept materialised (the d trained values are written into it at each forward, cost ∝ d);
- the input gradient with the same dense Θ;
- the gradient of ϑ, which is the weight gradient *sampled at the d trained positions*: a
  sampled dense-dense product (SDDMM) over a CSR pattern built once per mask, by the tiled CPU
  kernel of :mod:`drt_peft.layer.cpu_kernels` or a CUDA kernel. No D-sized weight gradient is formed,
  except transiently for a layer denser than :data:`DENSE_GRADIENT_DENSITY`, where the dense product
  is the faster way to the same d values.

An :class:`WeightOp` knows these products for one module type (``nn.Linear``, transformers'
``Conv1D``, ``nn.Conv2d``) and how to view its weight as an ``[out, fan_in]`` matrix, which is the
layout budgets and structures (rows, N:M along the inputs) are defined on.

Mixed precision: a layer computes in :func:`compute_dtype` (autocast's dtype under
``torch.autocast`` on the input's device, else the weight's) and casts its input to it; the
products take the dtype of their input and cast the weight to it, as autocast does for a plain
module. The backward of :class:`SampledWeightFunction` reproduces that dtype itself with
autocast disabled (the autocast state of the forward is not active in the backward), so the same
code serves CPU bfloat16 and CUDA float16/bfloat16 autocast.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ..validation import check_choice

logger = logging.getLogger(__name__)
T = TypeVar("T")

# The SDDMM kernels compute in these dtypes (numba and cuSPARSE); others are computed in float32 and cast back.
_SDDMM_DTYPES = (torch.float32, torch.float64)
# The dtypes autocast casts to its lower precision (it leaves float64 alone).
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (e.g. "meta")
        return False


def compute_dtype(weight_dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype a layer's products run in for a weight of ``weight_dtype`` on ``device_type``.

    While ``torch.autocast`` is enabled for ``device_type`` this is its dtype (bfloat16 or float16),
    as a plain ``nn.Linear`` would compute; float64 weights, which autocast leaves alone, and every
    weight outside autocast compute in their own dtype.
    """
    if weight_dtype in _AUTOCAST_ELIGIBLE and _autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight_dtype


def no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """A context with autocast disabled for ``device_type`` (a no-op when it is not enabled).

    The products below cast their operands themselves; autocast would cast the sparse operand of a
    CSR product to a dtype its kernel lacks, and does not cover the gradient products.
    """
    return torch.autocast(device_type, enabled=False) if _autocast_enabled(device_type) else contextlib.nullcontext()


def autocast_forward(op: WeightOp, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``op.forward`` with ``x``, ``weight`` and ``bias`` cast (differentiably) to :func:`compute_dtype`.

    For layers whose weight gradient autograd forms (supermask, projection, fixed classifier): the
    result has the dtype a plain module would return, under autocast or not, on any device.
    """
    dtype = compute_dtype(weight.dtype, x.device.type)
    with no_autocast(x.device.type):
        return op.forward(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))


def csr_structure(flat: Tensor, shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """``(crow_indices, col_indices)`` of the sorted flat positions ``flat`` in a 2-D ``shape``."""
    rows, cols = shape
    crow = torch.zeros(rows + 1, dtype=torch.int64, device=flat.device)
    crow[1:] = torch.bincount(torch.div(flat, cols, rounding_mode="floor"), minlength=rows).cumsum(0)
    return crow, flat % cols


def csr_tensor(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """The CSR tensor of these parts (which share their storage with it), unchecked: the callers build them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def csr_pattern(indices: Tensor, shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """CSR tensor whose non-zeros are the sorted flat ``indices`` of a 2-D ``shape`` (values zero).

    Row-major CSR order equals sorted flat-index order, so SDDMM values line up with ``indices``.
    """
    crow, col = csr_structure(indices, shape)
    return csr_tensor(crow, col, torch.zeros(indices.numel(), dtype=dtype, device=indices.device), shape)


def sddmm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the SDDMM computes in for ``dtype`` inputs (the CPU kernel has float32/float64 only)."""
    return dtype if dtype in _SDDMM_DTYPES else torch.float32


class KernelCache:
    """A mixin for modules that build kernels (CSR tensors, index layouts) from their tensors once and reuse them.

    The cache (``self._cache``, a dict the module creates in ``__init__``) is dropped when the module's tensors
    move or change dtype (``to``, ``half``, ...: ``nn.Module._apply``) and left behind by copies and pickles
    (CSR tensors cannot be deep-copied); whatever was cached is rebuilt on first use.
    """

    _cache: dict[tuple, Any]

    def _cached(self, key: tuple, build: Callable[[], T]) -> T:
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def _apply(self, fn, recurse: bool = True):
        self._cache.clear()
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": {}}


#: The SDDMM kernels for CUDA tensors: PyTorch's ``sampled_addmm`` (cuSPARSE), the Triton kernel of
#: :mod:`drt_peft.layer.triton_sddmm` (needs the ``triton`` package), or ``"dense"``: the dense weight gradient
#: of one layer on the tensor cores, gathered at ψ and freed (:func:`dense_sddmm`). CPU tensors use the tiled
#: kernel of :mod:`drt_peft.layer.cpu_kernels`.
CUDA_SDDMM_KERNELS = ("sampled_addmm", "triton", "dense")
_cuda_sddmm = {"kernel": "sampled_addmm"}

#: Above this density a layer's weight gradient is formed as a dense product and gathered at ψ
#: (transient, one layer at a time) instead of by SDDMM. The tiled SDDMM costs several times a dense
#: product's time per multiply-add, so the two meet where a fraction of the entries is trained: on
#: BERT-base's FFN shapes at 256 and 2,048 tokens, with one and two threads, the SDDMM was faster at 10%
#: and the dense product at 20% (``python benchmarks/layer_kernels.py``, the weight-gradient table).
DENSE_GRADIENT_DENSITY = 0.1


def set_cuda_sddmm_kernel(kernel: str) -> None:
    """Choose the SDDMM kernel for CUDA tensors, one of :data:`CUDA_SDDMM_KERNELS` (``"sampled_addmm"`` until
    ``scripts/gpu_check.sh`` has measured which is faster: ``benchmarks/gpu_step.py`` times all three)."""
    check_choice("kernel", kernel, CUDA_SDDMM_KERNELS)
    if kernel == "triton":
        from . import triton_sddmm  # noqa: F401  (fails here, not in a backward, without triton)
    _cuda_sddmm["kernel"] = kernel


def sddmm_kernel(pattern: Tensor) -> str:
    """The kernel :func:`sddmm` runs for ``pattern``: ``"tiled"`` on CPU, the chosen CUDA kernel on CUDA."""
    return _cuda_sddmm["kernel"] if pattern.device.type == "cuda" else "tiled"


def sddmm(pattern: Tensor, a: Tensor, b: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``(a @ b)`` at the non-zeros of ``pattern``, in CSR order: the sampled dense-dense product.

    ``a`` is ``[rows, T]`` and ``b`` ``[T, columns]``; for a weight gradient both are views of
    token-major activations. Computes in ``pattern.dtype`` and returns ``dtype`` (default
    ``a.dtype``): the gradient of float32 values from bfloat16 factors is computed and returned in
    float32, never rounded to bfloat16 on the way. On CPU the tiled kernel reads both factors in
    their token-major layout (:mod:`drt_peft.layer.cpu_kernels`). On CUDA ``sampled_addmm`` wants
    ``a`` row-major and ``b`` column-major and gets copies; the Triton kernel
    (:func:`set_cuda_sddmm_kernel` ``("triton")``) reads both in their own strides; ``("dense")``
    gathers the dense product (:func:`dense_sddmm`).
    """
    dtype = a.dtype if dtype is None else dtype
    kernel = sddmm_kernel(pattern)
    if kernel == "tiled":
        from .cpu_kernels import tiled_sddmm

        values = tiled_sddmm(
            pattern.crow_indices(), pattern.col_indices(), a.t().to(pattern.dtype), b.to(pattern.dtype)
        )
        return values.to(dtype)
    if kernel == "dense":
        return dense_sddmm(pattern, a, b).to(dtype)
    if kernel == "triton":
        from .triton_sddmm import coordinates
        from .triton_sddmm import sddmm as triton_sddmm

        return triton_sddmm(*coordinates(pattern), a, b).to(dtype)
    a_rows = a.to(pattern.dtype).contiguous()
    b_cols = b.t().to(pattern.dtype).contiguous().t()
    return torch.sparse.sampled_addmm(pattern, a_rows, b_cols, beta=0.0).values().to(dtype)


def dense_sddmm(pattern: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``(a @ b)`` at the non-zeros of ``pattern``, in CSR order, by the dense product gathered at those positions.

    The product is one layer's dense weight gradient, a transient D-sized tensor freed on return: on
    a GPU the tensor cores' dense product can cost less than a sampled one. It computes in the
    factors' dtype (bfloat16 under autocast, accumulated in float32 and rounded to bfloat16 as a
    plain module's weight gradient is), not in ``pattern.dtype``.
    """
    return (a @ b).reshape(-1).index_select(0, _pattern_flat_indices(pattern))


class WeightOp:
    """Products of one module type with an explicit weight (the base module holds the rest)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        #: The kernel that formed the last gradient of the trained values (None before the first backward).
        self.last_grad_kernel: str | None = None

    @property
    def pattern_shape(self) -> tuple[int, int]:
        """2-D shape of the weight on which the SDDMM pattern is laid (the weight's own layout)."""
        weight = self.module.weight
        return weight.shape[0], weight[0].numel()

    def to_matrix(self, tensor: Tensor) -> Tensor:
        """View a weight-shaped tensor as ``[out, fan_in]``."""
        return tensor.reshape(tensor.shape[0], -1)

    def from_matrix(self, matrix: Tensor) -> Tensor:
        """Inverse of :meth:`to_matrix`."""
        return matrix.reshape(self.module.weight.shape)

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    def grad_input(self, grad_out: Tensor, weight: Tensor, x: Tensor) -> Tensor:
        raise NotImplementedError

    def grad_weight_factors(self, grad_out: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(A, B)`` with ``A @ B`` = the dense weight gradient in :attr:`pattern_shape` layout."""
        raise NotImplementedError

    def grad_values(self, grad_out: Tensor, x: Tensor, pattern: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """Gradient of the trained values: the weight gradient at the pattern's positions only, in ``dtype``
        (default ``grad_out.dtype``), by the kernel :meth:`grad_kernel` chooses."""
        dtype = dtype or grad_out.dtype
        kernel = self.grad_kernel(pattern)
        if kernel != self.last_grad_kernel:
            shape = "×".join(map(str, self.pattern_shape))
            logger.debug(
                "%s %s, %d trained: weight gradient by %s", type(self.module).__name__, shape, pattern._nnz(), kernel
            )
            self.last_grad_kernel = kernel
        if kernel == "dense":
            return self.grad_weight(grad_out, x).reshape(-1)[_pattern_flat_indices(pattern)].to(dtype)
        a, b = self.grad_weight_factors(grad_out, x)
        return sddmm(pattern, a, b, dtype)

    def grad_kernel(self, pattern: Tensor) -> str:
        """How the gradient of the trained values is formed for ``pattern``: ``"dense"`` (the dense weight
        gradient, gathered) above :data:`DENSE_GRADIENT_DENSITY`, else the SDDMM's kernel
        (:func:`sddmm_kernel`). The last choice is :attr:`last_grad_kernel`, and each change is logged at
        DEBUG level on the ``drt_peft`` logger."""
        rows, columns = self.pattern_shape
        return "dense" if pattern._nnz() > DENSE_GRADIENT_DENSITY * rows * columns else sddmm_kernel(pattern)

    def grad_weight(self, grad_out: Tensor, x: Tensor) -> Tensor:
        """The dense weight gradient, shaped like the weight (only for methods that need it)."""
        a, b = self.grad_weight_factors(grad_out, x)
        return (a @ b).reshape(self.module.weight.shape)

    def grad_bias(self, grad_out: Tensor) -> Tensor:
        return grad_out.reshape(-1, grad_out.shape[-1]).sum(0)

    def add_bias(self, out: Tensor, bias: Tensor) -> Tensor:
        return out + bias


class LinearOp(WeightOp):
    """``nn.Linear``: y = x Wᵀ + b, W is ``[out, in]``; dW = gyᵀ x."""

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    def grad_input(self, grad_out: Tensor, weight: Tensor, x: Tensor) -> Tensor:
        return grad_out @ weight

    def grad_weight_factors(self, grad_out: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        return grad_out.reshape(-1, grad_out.shape[-1]).t(), x.reshape(-1, x.shape[-1])


class Conv1DOp(WeightOp):
    """transformers' ``Conv1D`` (GPT-2): y = x W + b, W is ``[in, out]``; dW = xᵀ gy."""

    def to_matrix(self, tensor: Tensor) -> Tensor:
        return tensor.t()

    def from_matrix(self, matrix: Tensor) -> Tensor:
        return matrix.t()

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        out = x.reshape(-1, x.shape[-1]) @ weight
        if bias is not None:
            out = out + bias
        return out.reshape(*x.shape[:-1], weight.shape[1])

    def grad_input(self, grad_out: Tensor, weight: Tensor, x: Tensor) -> Tensor:
        return grad_out @ weight.t()

    def grad_weight_factors(self, grad_out: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        return x.reshape(-1, x.shape[-1]).t(), grad_out.reshape(-1, grad_out.shape[-1])


class Conv2dOp(WeightOp):
    """``nn.Conv2d`` with zero padding; W is ``[out, in/groups, kh, kw]``.

    For ``groups == 1`` the weight gradient is gyᵀ·unfold(x), sampled at the trained positions.
    Grouped (e.g. depthwise) convolutions have small weights but no single im2col matrix; their
    weight gradient is formed densely with ``conv2d_weight`` and gathered at the d positions.
    """

    def __init__(self, module: nn.Conv2d) -> None:
        super().__init__(module)
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise ValueError(
                f"Conv2d with padding={module.padding!r}, padding_mode={module.padding_mode!r} is not supported; "
                "use integer zero padding"
            )

    def _conv_args(self) -> dict:
        m = self.module
        return {"stride": m.stride, "padding": m.padding, "dilation": m.dilation, "groups": m.groups}

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv2d(x, weight, bias, **self._conv_args())

    def grad_input(self, grad_out: Tensor, weight: Tensor, x: Tensor) -> Tensor:
        return torch.nn.grad.conv2d_input(x.shape, weight, grad_out, **self._conv_args())

    def grad_weight_factors(self, grad_out: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        m = self.module
        cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
        batch, fan_in, positions = cols.shape
        a = grad_out.reshape(batch, grad_out.shape[1], positions).permute(1, 0, 2).reshape(grad_out.shape[1], -1)
        b = cols.permute(0, 2, 1).reshape(batch * positions, fan_in)
        return a, b

    def grad_kernel(self, pattern: Tensor) -> str:
        return super().grad_kernel(pattern) if self.module.groups == 1 else "dense"

    def grad_weight(self, grad_out: Tensor, x: Tensor) -> Tensor:
        return torch.nn.grad.conv2d_weight(x, self.module.weight.shape, grad_out, **self._conv_args())

    def grad_bias(self, grad_out: Tensor) -> Tensor:
        return grad_out.sum((0, 2, 3))

    def add_bias(self, out: Tensor, bias: Tensor) -> Tensor:
        return out + bias.view(-1, 1, 1)


def _pattern_flat_indices(pattern: Tensor) -> Tensor:
    """The flat positions of the CSR ``pattern``'s non-zeros, in CSR order (no host synchronisation on a GPU)."""
    crow, col = pattern.crow_indices(), pattern.col_indices()
    rows = torch.repeat_interleave(
        torch.arange(crow.numel() - 1, device=crow.device), crow.diff(), output_size=col.numel()
    )
    return rows * pattern.shape[1] + col


#: Module type → its :class:`WeightOp`; :func:`register_weight_op` adds one.
SUPPORTED_TYPES: dict[type[nn.Module], type[WeightOp]] = {}


def register_weight_op(module_type: type[nn.Module], op: type[WeightOp]) -> None:
    """Make modules of exactly ``module_type`` embeddable, with ``op`` computing their products.

    Matching is by exact type, not ``isinstance``: subclasses of ``nn.Linear`` include quantized
    layers (whose weight is not a float matrix) and ``NonDynamicallyQuantizableLinear``, whose
    weight ``nn.MultiheadAttention`` reads directly without calling the module, so an embedding
    would silently never train. A subclass that does behave like its base is one registration.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type={module_type!r} must be an nn.Module subclass")
    if not (isinstance(op, type) and issubclass(op, WeightOp)):
        raise TypeError(f"op={op!r} must be a WeightOp subclass")
    SUPPORTED_TYPES[module_type] = op


for _type, _op in ((nn.Linear, LinearOp), (Conv1D, Conv1DOp), (nn.Conv2d, Conv2dOp)):
    register_weight_op(_type, _op)


def weight_op(module: nn.Module) -> WeightOp:
    """The :class:`WeightOp` for ``module``; raises for unsupported module types."""
    op = SUPPORTED_TYPES.get(type(module))
    if op is None:
        names = ", ".join(t.__name__ for t in SUPPORTED_TYPES)
        raise TypeError(
            f"cannot embed a {type(module).__name__}; supported module types: {names} "
            "(drt_peft.layer.register_weight_op adds one)"
        )
    return op(module)


class DenseProduct:
    """The forward and input-gradient products with a dense, materialised Θ = scale · M.

    ``materialise()`` writes ϑ into M and returns it (cost ∝ d). It runs again for the input
    gradient, so the backward never relies on a weight buffer kept from the forward: under FSDP
    the gathered weight is freed after the forward and gathered afresh for the backward.

    Both products compute in the dtype of their input (``x`` or ``grad_out``): M and the bias are
    cast to it, as autocast casts a plain module's weight (a transient copy when they differ).
    """

    def __init__(self, op: WeightOp, materialise: Callable[[], Tensor], scale: float = 1.0) -> None:
        self.op, self.materialise, self.scale = op, materialise, scale

    def _weight(self, dtype: torch.dtype) -> Tensor:
        weight = self.materialise()
        return weight if weight.dtype == dtype else weight.to(dtype)

    def forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        if self.scale == 1.0:
            return self.op.forward(x, self._weight(x.dtype), bias)
        out = self.op.forward(x, self._weight(x.dtype), None) * self.scale
        return out if bias is None else self.op.add_bias(out, bias)

    def grad_input(self, grad_out: Tensor, x: Tensor) -> Tensor:
        grad = self.op.grad_input(grad_out, self._weight(grad_out.dtype), x)
        return grad if self.scale == 1.0 else grad * self.scale


class CSRProduct:
    """The same products with a pruned Θ as CSR matrices of M (Θ viewed ``[out, fan_in]``) and Mᵀ.

    y = x Mᵀ + b and ∂L/∂x = gy M. On CPU they run on the tiled kernel of
    :mod:`drt_peft.layer.cpu_kernels`, which reads and writes the token-major activations as they
    are; elsewhere on PyTorch's CSR products, y = (M xᵀ)ᵀ. Below about 3% density they beat dense
    products on BERT-base shapes (``benchmarks/layer_kernels.py``). Both run in the dtype of the
    values (the kernels lack bfloat16 and float16), with autocast disabled; the result is cast to the
    input's dtype, which is what a dense product would return.
    """

    def __init__(self, m: Tensor, mt: Tensor) -> None:
        self.m, self.mt = m, mt

    @staticmethod
    def _apply(matrix: Tensor, tokens: Tensor) -> Tensor:
        """``tokens @ matrixᵀ`` for the ``[T, columns]`` rows of ``tokens``, in the matrix's dtype."""
        tokens = tokens.to(matrix.dtype)
        if tokens.device.type == "cpu":
            from .cpu_kernels import tiled_spmm

            return tiled_spmm(matrix.crow_indices(), matrix.col_indices(), matrix.values(), tokens)
        return (matrix @ tokens.t()).t()

    def forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        with no_autocast(x.device.type):
            out = self._apply(self.m, x.reshape(-1, x.shape[-1]))
            if bias is not None:
                out = out + bias.to(out.dtype)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.m.shape[0])

    def grad_input(self, grad_out: Tensor, x: Tensor) -> Tensor:
        with no_autocast(grad_out.device.type):
            grad = self._apply(self.mt, grad_out.reshape(-1, grad_out.shape[-1]))
        return grad.to(x.dtype).reshape(x.shape)


def matrix_positions(op: WeightOp, indices: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """Where the weight entries at flat ``indices`` lie in the ``[out, fan_in]`` matrix view M of the weight
    (flat, row-major positions, in the order of ``indices``), and M's shape."""
    shape = op.module.weight.shape
    matrix = op.to_matrix(torch.arange(shape.numel(), device=indices.device).reshape(shape))
    position = indices.new_empty(shape.numel())
    position[matrix.reshape(-1)] = torch.arange(shape.numel(), device=indices.device)
    return position[indices], (matrix.shape[0], matrix.shape[1])


class CSRLayout:
    """Index structure of CSR(M) and CSR(Mᵀ) for one ψ, built once per mask; :meth:`bind` adds ϑ."""

    def __init__(self, op: WeightOp, indices: Tensor) -> None:
        in_m, self.shape = matrix_positions(op, indices)
        rows, cols = self.shape
        in_mt = (in_m % cols) * rows + torch.div(in_m, cols, rounding_mode="floor")
        self.order_m, self.order_mt = torch.argsort(in_m), torch.argsort(in_mt)
        self.m = csr_structure(in_m[self.order_m], self.shape)
        self.mt = csr_structure(in_mt[self.order_mt], (cols, rows))

    def bind(self, values: Tensor) -> CSRProduct:
        rows, cols = self.shape
        return CSRProduct(
            csr_tensor(*self.m, values[self.order_m], (rows, cols)),
            csr_tensor(*self.mt, values[self.order_mt], (cols, rows)),
        )


class SampledWeightFunction(torch.autograd.Function):
    """y = Θ-product(x) + b with ∂L/∂ϑ = (∂L/∂Θ)[ψ] computed by SDDMM (see module docstring).

    ``product`` (a :class:`DenseProduct` or :class:`CSRProduct`) provides Θ; no weight tensor is
    saved for backward (Θ cannot change between a forward and its backward: only an optimizer step
    changes ϑ, after the backward). When ``dense_sink`` is given (a layer capturing the dense
    gradient for a method that needs it, e.g. RigL at its update steps) the dense weight
    gradient is formed once, handed to ``dense_sink.accumulate_dense_grad`` and gathered at ψ.

    Dtypes: every product computes in ``x``'s dtype, the compute dtype the caller chose
    (:func:`compute_dtype`: autocast's dtype under ``torch.autocast``). The forward records it by
    saving ``x``; the backward reproduces it with autocast disabled, whatever autocast state it runs
    in, casting ``grad_out`` to it. The SDDMM computes in ``pattern``'s dtype (float32 for half
    precision, see :func:`sddmm_dtype`); each gradient is returned in the dtype of its input
    (ϑ, ``x``, bias), e.g. float32 ϑ trained through bfloat16 products get a float32 gradient.
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        values: Tensor,
        bias: Tensor | None,
        product: DenseProduct | CSRProduct,
        op: WeightOp,
        pattern: Tensor,
        dense_sink: object | None = None,
    ):
        ctx.product, ctx.op, ctx.pattern, ctx.dense_sink = product, op, pattern, dense_sink
        # ψ as of this forward: the gradient of ϑ must match the values this forward used
        ctx.indices = None if dense_sink is None else dense_sink.drt_indices
        ctx.values_dtype = values.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x)
        with no_autocast(x.device.type):
            return product.forward(x, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (x,) = ctx.saved_tensors
        with no_autocast(x.device.type):
            grad_out = grad_out.to(x.dtype).contiguous()
            grad_x = ctx.product.grad_input(grad_out, x) if ctx.needs_input_grad[0] else None
            grad_values = None
            if ctx.dense_sink is not None:
                dense = ctx.op.grad_weight(grad_out, x)
                ctx.dense_sink.accumulate_dense_grad(dense)
                if ctx.needs_input_grad[1]:
                    grad_values = dense.reshape(-1)[ctx.indices].to(ctx.values_dtype)
            elif ctx.needs_input_grad[1]:
                grad_values = ctx.op.grad_values(grad_out, x, ctx.pattern, ctx.values_dtype)
            grad_bias = None
            if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
                grad_bias = ctx.op.grad_bias(grad_out).to(ctx.bias_dtype)
        return grad_x, grad_values, grad_bias, None, None, None, None
