"""A tiled SDDMM for CPU tensors that reads both factors in their natural, token-major layout.

The weight gradient of a layer is a sum over the T tokens of a batch, ∂L/∂W = Aᵀ B (``nn.Linear``:
A = ∂L/∂y ``[T, out]``, B = x ``[T, in]``; ``Conv1D`` swaps them). Each of the d trained entries
(r, c) is one dot product over the tokens, Σₜ A[t, r]·B[t, c]. ``torch.sparse.sampled_addmm`` wants
the columns of A and B contiguous, which costs two transposing copies of T-sized activations per
layer per step, and PyTorch's transposing copy of a matrix runs on one thread: on BERT-base shapes
those copies took longer than the SDDMM itself and did not get faster with more cores.

Here the tokens are cut into tiles of :data:`TILE` rows. Each thread takes a share of the tiles;
for each one it transposes the rows of A that hold trained entries and the touched columns of B
into two buffers of its own, small enough to stay in cache, then forms every trained entry's dot
over the tile with contiguous loads the compiler vectorises. Work is T·d multiply-adds plus one
read of the two factors; extra memory is one partial sum per trained entry and thread. The kernel
uses as many threads as ``torch.get_num_threads()`` (capped by numba's pool), so ``torch.set_num_threads``
governs it as it governs PyTorch's own kernels.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import Tensor

#: Tokens per tile: a tile of a 3,072-wide factor is 768 KiB in float32, and per-entry dots of 64
#: values vectorise well (16, 32, 64 and 128 measured on BERT-base shapes; 64 was fastest).
TILE = 64


@numba.njit(parallel=True, fastmath=True, nogil=True, cache=True)
def _tiled_sddmm(a, b, crow, col, tile, groups):
    """Partial sums ``[groups, d]``; row g holds the dots over the tiles g, g + groups, ..."""
    tokens, rows = a.shape
    columns = b.shape[1]
    partial = np.zeros((groups, col.shape[0]), dtype=a.dtype)
    used = np.zeros(columns, dtype=np.bool_)
    for k in range(col.shape[0]):
        used[col[k]] = True
    tiles = (tokens + tile - 1) // tile
    for g in numba.prange(groups):
        a_tile = np.empty((rows, tile), dtype=a.dtype)
        b_tile = np.empty((columns, tile), dtype=a.dtype)
        for i in range(g, tiles, groups):
            start = i * tile
            n = min(tile, tokens - start)
            for r in range(rows):
                if crow[r + 1] > crow[r]:
                    for t in range(n):
                        a_tile[r, t] = a[start + t, r]
            for c in range(columns):
                if used[c]:
                    for t in range(n):
                        b_tile[c, t] = b[start + t, c]
            for r in range(rows):
                for k in range(crow[r], crow[r + 1]):
                    c = col[k]
                    total = partial[g, k]
                    for t in range(n):
                        total += a_tile[r, t] * b_tile[c, t]
                    partial[g, k] = total
    return partial


def tiled_sddmm(crow: Tensor, col: Tensor, a_tokens: Tensor, b_tokens: Tensor) -> Tensor:
    """``(a_tokensᵀ @ b_tokens)`` at the CSR pattern ``(crow, col)``, in CSR order.

    ``a_tokens`` is ``[T, rows]`` and ``b_tokens`` ``[T, columns]``, both of one floating dtype
    (float32 or float64); a non-contiguous factor is copied once. Returns the d values in that dtype.
    """
    a, b = a_tokens.detach().contiguous(), b_tokens.detach().contiguous()
    tiles = -(-a.shape[0] // TILE)
    if tiles == 0 or col.numel() == 0:
        return a.new_zeros(col.numel())
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS, tiles))
    numba.set_num_threads(threads)
    partial = _tiled_sddmm(a.numpy(), b.numpy(), crow.numpy(), col.numpy(), TILE, threads)
    return torch.from_numpy(partial).sum(0)
