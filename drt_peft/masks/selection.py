"""Selecting ψ from scores: exact, deterministic top-k under a structure (survey §3.1).

All functions work on ``[out, fan_in]`` matrix views of the scores. Equal scores resolve to the
lower position (row-major, layers in target order), so the same scores give the same mask on
every process and device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..topk import top_k_mask


def indices_of(mask: Tensor) -> Tensor:
    """ψ of a boolean mask: the sorted flat indices of its True entries (in the tensor's own layout)."""
    return torch.nonzero(mask.reshape(-1)).flatten()


def nm_candidates(scores: Tensor, n: int, m: int, name: str) -> Tensor:
    """Mask of the ``n`` best entries in each block of ``m`` consecutive inputs of ``scores [out, fan_in]``."""
    rows, fan_in = scores.shape
    if fan_in % m:
        raise ValueError(f"structure='{n}:{m}' needs the input dimension of {name} ({fan_in}) to be divisible by {m}")
    blocks = scores.reshape(rows, fan_in // m, m)
    order = torch.argsort(blocks, dim=-1, descending=True, stable=True)[..., :n]
    mask = torch.zeros_like(blocks, dtype=torch.bool)
    mask.scatter_(-1, order, True)
    return mask.reshape(rows, fan_in)


def select_unstructured(scores: Sequence[Tensor], counts: Sequence[int] | None, total: int) -> list[Tensor]:
    """Per-layer top-``counts[l]``, or one global top-``total`` when ``counts`` is None."""
    if counts is not None:
        return [top_k_mask(s.flatten(), k).reshape(s.shape) for s, k in zip(scores, counts, strict=True)]
    joint = top_k_mask(torch.cat([s.flatten() for s in scores]), total)
    return [part.reshape(s.shape) for part, s in zip(joint.split([s.numel() for s in scores]), scores, strict=True)]


def select_rows(scores: Sequence[Tensor], counts: Sequence[int] | None, total: int) -> list[Tensor]:
    """Whole output rows, ranked by their mean score; a layer's count is rounded to whole rows.

    With ``counts`` None, rows of all layers are ranked jointly and taken until ``total`` entries
    are covered.
    """
    row_scores = [s.mean(dim=1) for s in scores]
    if counts is not None:
        keep = [
            top_k_mask(r, 0 if k == 0 else max(1, round(k / s.shape[1])))
            for r, s, k in zip(row_scores, scores, counts, strict=True)
        ]
    else:
        joint = torch.cat(row_scores)
        widths = torch.cat([torch.full((s.shape[0],), s.shape[1], dtype=torch.int64) for s in scores])
        order = torch.sort(joint.cpu(), descending=True, stable=True).indices
        covered = widths[order].cumsum(0)
        taken = int(torch.searchsorted(covered, torch.tensor(total))) + 1
        chosen = torch.zeros(joint.numel(), dtype=torch.bool)
        chosen[order[: min(taken, joint.numel())]] = True
        keep = list(chosen.to(joint.device).split([s.shape[0] for s in scores]))
    return [k[:, None].expand_as(s).clone() for k, s in zip(keep, scores, strict=True)]
