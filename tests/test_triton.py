"""The Triton SDDMM against a dense reference: compiled on a GPU, or on CPU tensors in Triton's interpreter.

Without a GPU the conftest sets ``TRITON_INTERPRET=1`` (an explicit setting is kept), and the
kernel runs on CPU tensors; otherwise it is compiled and the same tests run on CUDA tensors
(``scripts/gpu_check.sh``).
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip(
    "triton", reason="the Triton kernel needs the optional triton package (pip install drt-peft[triton])"
)

from drt_peft.layer import ops
from drt_peft.layer.ops import csr_pattern
from drt_peft.layer.triton_sddmm import BLOCK_K, BLOCK_N, coordinates, sddmm

#: Where the kernel's operands live: CPU tensors for the interpreter, else the GPU the kernel is compiled for.
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 and no CUDA device: nothing can run the kernel", allow_module_level=True)


def _case(rows: int, cols: int, depth: int, nnz: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted flat positions of ``nnz`` entries of a ``rows × cols`` weight and ``depth × (rows + cols)`` data,
    on :data:`DEVICE`."""
    g = torch.Generator().manual_seed(seed)
    indices = torch.randperm(rows * cols, generator=g)[:nnz].sort().values
    return indices.to(DEVICE), torch.randn(depth, rows + cols, generator=g).to(DEVICE)


@pytest.mark.parametrize(
    ("rows", "cols", "depth", "nnz"),
    [(12, 20, 40, 50), (7, 9, BLOCK_K + 3, BLOCK_N + 1), (64, 48, 5, 64 * 48), (3, 4, 1, 1)],
)
def test_the_kernel_equals_the_dense_product_at_the_trained_positions(rows, cols, depth, nnz) -> None:
    """Linear's factors, as the backward hands them over: ``grad_outᵀ`` and ``x``, both strided views."""
    indices, data = _case(rows, cols, depth, nnz)
    grad_out, x = data[:, :rows], data[:, rows:]
    pattern = csr_pattern(indices, (rows, cols), torch.float32)
    got = sddmm(*coordinates(pattern), grad_out.t(), x)
    expected = (grad_out.t().double() @ x.double()).reshape(-1)[indices]
    assert got.dtype == torch.float32 and torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_half_precision_factors_accumulate_in_float32() -> None:
    indices, data = _case(16, 16, 300, 40)
    a, b = data[:, :16].t().bfloat16(), data[:, 16:].bfloat16()
    got = sddmm(*coordinates(csr_pattern(indices, (16, 16), torch.float32)), a, b)
    expected = (a.double() @ b.double()).reshape(-1)[indices]
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-4)


def test_conv1d_factors_and_empty_patterns() -> None:
    """GPT-2's Conv1D hands over ``xᵀ`` and ``grad_out``; a layer may train no entry at all."""
    indices, data = _case(10, 6, 24, 17)
    x, grad_out = data[:, :10], data[:, 10:]
    got = sddmm(*coordinates(csr_pattern(indices, (10, 6), torch.float32)), x.t(), grad_out)
    assert torch.allclose(got, (x.t() @ grad_out).reshape(-1)[indices], atol=1e-5)
    empty = csr_pattern(torch.empty(0, dtype=torch.int64, device=DEVICE), (10, 6), torch.float32)
    assert sddmm(*coordinates(empty), x.t(), grad_out).numel() == 0
    with pytest.raises(ValueError, match=r"a is \(10, 24\) and b is \(6, 24\); their inner sizes must agree"):
        sddmm(*coordinates(empty), x.t(), grad_out.t())


def test_the_cuda_kernel_is_chosen_by_name() -> None:
    allowed = r"\['sampled_addmm', 'triton', 'dense'\]"
    with pytest.raises(ValueError, match=rf"kernel='cublas' is not supported; use one of {allowed}"):
        ops.set_cuda_sddmm_kernel("cublas")
    ops.set_cuda_sddmm_kernel("triton")
    ops.set_cuda_sddmm_kernel("sampled_addmm")
