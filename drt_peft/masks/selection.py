"""Selecting ψ from scores: exact, deterministic top-k under a structure (survey §3.1).

All functions work on ``[out, fan_in]`` matrix views of the scores. Equal scores resolve to the
lower position (row-major, layers in target order), so the same scores give the same mask on
every process and device.
"""

from __future__ import annotations

import itertools
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


#: Entries of the descending order the capped selection reads at a time (it usually stops in the first chunk).
_CHUNK = 1 << 16


def select_capped(
    scores: Sequence[Tensor], counts: Sequence[int] | None, total: int, caps: Sequence[tuple[int, int]]
) -> list[Tensor]:
    """As :func:`select_unstructured`, with at most ``caps[l] = (per_row, per_column)`` entries in any row and any
    column of layer l: per layer (``counts``) or jointly over all layers (``counts`` None) by :func:`capped_top_k`."""
    if counts is not None:
        return [capped_top_k([s], k, [c])[0] for s, k, c in zip(scores, counts, caps, strict=True)]
    return capped_top_k(scores, total, caps)


def capped_top_k(
    scores: Sequence[Tensor], k: int, caps: Sequence[tuple[int, int]], held: Sequence[Tensor] | None = None
) -> list[Tensor]:
    """Masks of ``k`` entries of the ``[out, fan_in]`` ``scores``, taken greedily in one descending order of all of
    them (ties: lower position, matrices in order): each entry is taken unless its row already holds ``per_row`` or
    its column ``per_column`` taken entries (``caps`` per matrix), until ``k`` are taken. ``held`` (boolean, shaped
    like ``scores``) marks entries already in the mask: they are never taken again and use up their lines' room, as
    when drop-and-grow regrows next to the entries it kept.

    What a full row or column turns away goes to the next-best entries, so exactly ``k`` are taken whenever
    ``k`` fits :func:`~drt_peft.masks.budgets.capped_capacity`; with no binding cap this is the plain top-k. It is
    the greedy (maximal, score-ordered) selection under both caps; with one cap only it is also the best one.
    The greedy pass reads the best 4·k entries first (at least :data:`_CHUNK`) and only widens that prefix of the
    order, four times at a time, while the caps turn too many away, so a large layer is not sorted in full.
    """
    shapes = [tuple(s.shape) for s in scores]
    flat = torch.cat([s.detach().flatten().cpu() for s in scores])
    sizes = torch.tensor([s.numel() for s in scores])
    rows_room = torch.cat([torch.full((out,), per_row) for (out, _), (per_row, _) in zip(shapes, caps, strict=True)])
    columns_room = torch.cat(
        [torch.full((fan_in,), per_column) for (_, fan_in), (_, per_column) in zip(shapes, caps, strict=True)]
    )
    free = torch.ones(flat.numel(), dtype=torch.bool)
    if held is not None:
        held = [h.detach().cpu() for h in held]
        rows_room -= torch.cat([h.sum(dim=1) for h in held])
        columns_room -= torch.cat([h.sum(dim=0) for h in held])
        free = ~torch.cat([h.flatten() for h in held])
    lines = _Lines(shapes, sizes)
    width = min(flat.numel(), max(4 * k, _CHUNK))
    while True:
        best = indices_of(top_k_mask(flat, width))  # the first ``width`` entries of the full stable order
        order = best[torch.sort(flat[best], descending=True, stable=True).indices]
        taken = lines.greedy(order[free[order]], k, rows_room.clamp(min=0).tolist(), columns_room.clamp(min=0).tolist())
        if len(taken) == k or width == flat.numel():
            break
        width = min(flat.numel(), 4 * width)
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[torch.tensor(taken, dtype=torch.int64)] = True
    return [
        part.reshape(shape).to(s.device)
        for part, shape, s in zip(mask.split(sizes.tolist()), shapes, scores, strict=True)
    ]


class _Lines:
    """Where each entry of the ``[out, fan_in]`` matrices, flattened and concatenated, lies: its row and its column,
    numbered over all matrices."""

    def __init__(self, shapes: list[tuple[int, ...]], sizes: Tensor) -> None:
        self.starts, self.ends = sizes.cumsum(0) - sizes, sizes.cumsum(0)
        self.fan_ins = torch.tensor([shape[1] for shape in shapes])
        self.first_row = torch.tensor([0, *itertools.accumulate(shape[0] for shape in shapes)][:-1])
        self.first_column = torch.tensor([0, *itertools.accumulate(shape[1] for shape in shapes)][:-1])

    def greedy(self, order: Tensor, k: int, rows_left: list[int], columns_left: list[int]) -> list[int]:
        """Entries of ``order`` taken in turn while their row and column have room left, up to ``k``."""
        taken: list[int] = []
        for chunk in order.split(_CHUNK):
            if len(taken) == k:
                break
            layer = torch.searchsorted(self.ends, chunk, right=True)
            local = chunk - self.starts[layer]
            rows = (local // self.fan_ins[layer] + self.first_row[layer]).tolist()
            columns = (local % self.fan_ins[layer] + self.first_column[layer]).tolist()
            for entry, row, column in zip(chunk.tolist(), rows, columns, strict=True):
                if rows_left[row] and columns_left[column]:
                    rows_left[row] -= 1
                    columns_left[column] -= 1
                    taken.append(entry)
                    if len(taken) == k:
                        break
        return taken


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
