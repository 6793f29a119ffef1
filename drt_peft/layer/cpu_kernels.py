"""Tiled sparse kernels for CPU tensors that read and write activations in their token-major layout.

A layer's activations are token-major: x is ``[T, in]``, ∂L/∂y is ``[T, out]``. The products a DRT
layer needs on them are sums over a sparse pattern, and each is a set of dot products or axpys along
the tokens:

- the gradient of the d trained values (SDDMM): for each trained (r, c), Σₜ A[t, r]·B[t, c];
- the pruned layer's forward and input gradient (SpMM): y[t, r] = Σ_{(r, c) ∈ ψ} Θ[r, c]·x[t, c].

PyTorch's CPU kernels for both (``torch.sparse.sampled_addmm``, CSR @ dense) want the token axis
contiguous, so each call makes transposing copies of T-sized activations, and PyTorch's transposing
copy of a matrix runs on one thread: on BERT-base shapes those copies took longer than the sparse
products themselves and did not get faster with more cores.

Here the tokens are cut into tiles of :data:`TILE`. Each thread takes a share of the tiles; for
each one it transposes the rows of the operands it needs into buffers of its own, small enough to
stay in cache, runs the sparse product on them with contiguous loads along the tile (which the
compiler vectorises), and writes back. Work is d multiply-adds per token plus one read of each
operand; the SpMM writes its token-major output directly. The kernels use as many threads as
``torch.get_num_threads()``, so ``torch.set_num_threads`` governs them as it governs PyTorch's own
kernels, up to the size of numba's pool (below).

numba's OpenMP workers run on PyTorch's own libgomp, which starts with the active wait policy: idle
workers spin at full load between parallel regions. A pool larger than the threads a call uses
would spin on cores that PyTorch's threads or other processes need (with ``torch.set_num_threads(1)``
and a pool of two, the second worker kept a second core busy while every kernel ran on one). So the
pool is launched at the first call with as many workers as torch uses then (:func:`_start_pool`),
unless ``NUMBA_NUM_THREADS`` is set: a program that raises torch's thread count after its first
training step sets it to the most it will use.
"""

from __future__ import annotations

import functools
import os

import numba
import numpy as np
import torch
from torch import Tensor

#: Tokens per tile: a tile of a 3,072-wide operand is 768 KiB in float32, and dots of 64 values
#: vectorise well (16, 32, 64 and 128 measured on BERT-base shapes; 64 was fastest).
TILE = 64
#: Multiply-adds (and tile loads) a thread should have before another one is started: below this a call runs on
#: fewer threads, since waking and joining a thread costs more than it saves on small products (the grain size
#: of PyTorch's own ``parallel_for`` plays the same role).
GRAIN = 1 << 20


@numba.njit(inline="always")
def _load_tile(source, start, n, wanted, tile):  # numba compiles one version per argument type
    """``tile[j, :n] = source[start:start + n, j]`` for every column j with ``wanted[j]``."""
    for j in range(source.shape[1]):
        if wanted[j]:
            for t in range(n):
                tile[j, t] = source[start + t, j]


@numba.njit
def _columns_used(col, columns):
    used = np.zeros(columns, dtype=np.bool_)
    for k in range(col.shape[0]):
        used[col[k]] = True
    return used


@numba.njit(parallel=True, fastmath=True, nogil=True, cache=True)
def _tiled_sddmm(a, b, crow, col, tile, groups):
    """Partial sums ``[groups, d]``; row g holds the dots over the tiles g, g + groups, ..."""
    tokens = a.shape[0]
    partial = np.zeros((groups, col.shape[0]), dtype=a.dtype)
    rows_used = crow[1:] > crow[:-1]
    columns_used = _columns_used(col, b.shape[1])
    tiles = (tokens + tile - 1) // tile
    for g in numba.prange(groups):
        a_tile = np.empty((a.shape[1], tile), dtype=a.dtype)
        b_tile = np.empty((b.shape[1], tile), dtype=a.dtype)
        for i in range(g, tiles, groups):
            start = i * tile
            n = min(tile, tokens - start)
            _load_tile(a, start, n, rows_used, a_tile)
            _load_tile(b, start, n, columns_used, b_tile)
            for r in range(a.shape[1]):
                for k in range(crow[r], crow[r + 1]):
                    c = col[k]
                    total = partial[g, k]
                    for t in range(n):
                        total += a_tile[r, t] * b_tile[c, t]
                    partial[g, k] = total
    return partial


@numba.njit(parallel=True, fastmath=True, nogil=True, cache=True)
def _tiled_spmm(x, crow, col, values, tile, groups):
    """``y[t, r] = Σ_k values[k]·x[t, col[k]]`` over row r's entries, token-major ``[T, rows]``."""
    tokens = x.shape[0]
    rows = crow.shape[0] - 1
    y = np.empty((tokens, rows), dtype=x.dtype)
    columns_used = _columns_used(col, x.shape[1])
    tiles = (tokens + tile - 1) // tile
    for g in numba.prange(groups):
        x_tile = np.empty((x.shape[1], tile), dtype=x.dtype)
        y_tile = np.empty((rows, tile), dtype=x.dtype)
        for i in range(g, tiles, groups):
            start = i * tile
            n = min(tile, tokens - start)
            _load_tile(x, start, n, columns_used, x_tile)
            for r in range(rows):
                for t in range(n):
                    y_tile[r, t] = 0
                for k in range(crow[r], crow[r + 1]):
                    value, c = values[k], col[k]
                    for t in range(n):
                        y_tile[r, t] += value * x_tile[c, t]
            for t in range(n):
                for r in range(rows):
                    y[start + t, r] = y_tile[r, t]
    return y


@functools.cache
def _start_pool() -> None:
    """Launch numba's thread pool with ``torch.get_num_threads()`` workers (within numba's default, the cores),
    unless ``NUMBA_NUM_THREADS`` chose the size or the pool already runs; the kernels never use more threads than
    it has."""
    from numba.np.ufunc import parallel

    if "NUMBA_NUM_THREADS" not in os.environ and not getattr(parallel, "_is_initialized", True):
        threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
        numba.config.NUMBA_NUM_THREADS = parallel.NUM_THREADS = threads
    numba.get_num_threads()  # launches the pool


def _threads(tokens: int, work_per_token: int) -> int:
    """Threads for a call: torch's count, within numba's pool, at most one per tile and per :data:`GRAIN` of work;
    numba is set to it."""
    _start_pool()
    by_work = tokens * work_per_token // GRAIN
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS, -(-tokens // TILE), by_work))
    numba.set_num_threads(threads)
    return threads


def tiled_sddmm(crow: Tensor, col: Tensor, a_tokens: Tensor, b_tokens: Tensor) -> Tensor:
    """``(a_tokensᵀ @ b_tokens)`` at the CSR pattern ``(crow, col)``, in CSR order.

    ``a_tokens`` is ``[T, rows]`` and ``b_tokens`` ``[T, columns]``, both of one floating dtype
    (float32 or float64); a non-contiguous operand is copied once. Returns the d values in that dtype.
    """
    a, b = a_tokens.detach().contiguous(), b_tokens.detach().contiguous()
    if a.shape[0] == 0 or col.numel() == 0:
        return a.new_zeros(col.numel())
    threads = _threads(a.shape[0], col.numel() + a.shape[1] + b.shape[1])
    partial = _tiled_sddmm(a.numpy(), b.numpy(), crow.numpy(), col.numpy(), TILE, threads)
    return torch.from_numpy(partial).sum(0)


def tiled_spmm(crow: Tensor, col: Tensor, values: Tensor, x_tokens: Tensor) -> Tensor:
    """``x_tokens @ Mᵀ`` for the CSR matrix M = ``(crow, col, values)`` of ``[rows, columns]``: ``[T, rows]``.

    ``x_tokens`` is ``[T, columns]`` of the values' dtype (float32 or float64); a non-contiguous
    operand is copied once.
    """
    x = x_tokens.detach().contiguous()
    rows = crow.numel() - 1
    if x.shape[0] == 0:
        return x.new_zeros(0, rows)
    threads = _threads(x.shape[0], col.numel() + x.shape[1] + rows)
    return torch.from_numpy(_tiled_spmm(x.numpy(), crow.numpy(), col.numpy(), values.detach().numpy(), TILE, threads))
