"""Exact, deterministic top-k: the one selection rule every mask in the package is made with."""

from __future__ import annotations

import torch
from torch import Tensor


def top_k_mask(scores: Tensor, k: int) -> Tensor:
    """Boolean mask of the ``k`` largest entries of the 1-D ``scores``; ties go to lower indices."""
    n = scores.numel()
    mask = torch.zeros(n, dtype=torch.bool, device=scores.device)
    if k <= 0:
        return mask
    if k >= n:
        return mask.fill_(True)
    threshold = torch.kthvalue(scores, n - k + 1).values
    mask = scores > threshold
    ties = torch.nonzero(scores == threshold).flatten()[: k - int(mask.sum())]
    mask[ties] = True
    return mask
