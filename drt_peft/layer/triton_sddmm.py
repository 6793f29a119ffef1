"""A Triton SDDMM for the gradient of ϑ on CUDA: out[n] = Σₖ a[rₙ, k]·b[k, cₙ] at the d trained positions.

The sampled dense-dense product reads ``a`` and ``b`` through their own strides, so the
transposed views the weight gradient comes in (``grad_outᵀ`` and ``x`` for a Linear layer) need
no copies. Each program takes ``BLOCK_N`` trained positions (ψ in CSR order: consecutive
positions share rows, so ``a``'s rows are re-read from cache) and reduces over ``k`` in chunks
of ``BLOCK_K``, accumulating in float32 whatever the input dtype.

Requires the optional ``triton`` package. On a machine without a GPU the same kernel runs in
Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is imported), which is how the
tests check it against a dense reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_N = 64
BLOCK_K = 32


@triton.jit
def _sddmm_kernel(
    a_ptr, b_ptr, rows_ptr, cols_ptr, out_ptr, nnz, depth,
    stride_a_row, stride_a_k, stride_b_k, stride_b_col,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = n < nnz
    rows = tl.load(rows_ptr + n, mask=live, other=0)
    cols = tl.load(cols_ptr + n, mask=live, other=0)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, depth, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        valid = live[:, None] & (k < depth)[None, :]
        a = tl.load(a_ptr + rows[:, None] * stride_a_row + k[None, :] * stride_a_k, mask=valid, other=0.0)
        b = tl.load(b_ptr + k[None, :] * stride_b_k + cols[:, None] * stride_b_col, mask=valid, other=0.0)
        acc += tl.sum(a.to(tl.float32) * b.to(tl.float32), axis=1)
    tl.store(out_ptr + n, acc, mask=live)


def coordinates(pattern: Tensor) -> tuple[Tensor, Tensor]:
    """The row and column of every stored entry of the CSR ``pattern``, in CSR order.

    The number of rows produced is given (``output_size``), so a GPU computes them without
    synchronising with the host, which would stall every backward.
    """
    crow, cols = pattern.crow_indices(), pattern.col_indices()
    rows = torch.repeat_interleave(
        torch.arange(crow.numel() - 1, device=crow.device), crow.diff(), output_size=cols.numel()
    )
    return rows, cols


def sddmm(rows: Tensor, cols: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``(a @ b)[rows, cols]`` in float32, ``a`` of shape ``[R, K]`` and ``b`` of shape ``[K, C]`` in any strides."""
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"sddmm: a is {tuple(a.shape)} and b is {tuple(b.shape)}; their inner sizes must agree")
    out = torch.empty(rows.numel(), dtype=torch.float32, device=a.device)
    if rows.numel():
        grid = (triton.cdiv(rows.numel(), BLOCK_N),)
        _sddmm_kernel[grid](
            a, b, rows, cols, out, rows.numel(), a.shape[1], *a.stride(), *b.stride(), BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K
        )
    return out
