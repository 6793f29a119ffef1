"""Budgets, structures and criteria: exact counts, exact top-k, determinism."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_mlp
from torch import nn

from drt_peft import MagnitudeConfig, RandomConfig
from drt_peft.layer import weight_op
from drt_peft.masks import compute_indices
from drt_peft.masks.budgets import apportion, layer_counts
from drt_peft.masks.selection import nm_candidates
from drt_peft.targeting import Target
from drt_peft.topk import top_k_mask


def _targets(*shapes: tuple[int, int], seed: int = 0) -> list[Target]:
    torch.manual_seed(seed)
    out = []
    for i, (rows, cols) in enumerate(shapes):
        module = nn.Linear(cols, rows)
        out.append(Target(f"layer{i}", module, weight_op(module)))
    return out


def _indices(targets: list[Target], config) -> list[torch.Tensor]:
    return compute_indices(nn.ModuleList(t.module for t in targets), targets, config)


def test_top_k_breaks_ties_towards_lower_indices() -> None:
    scores = torch.tensor([1.0, 3.0, 2.0, 3.0, 2.0, 2.0, 0.0])
    assert top_k_mask(scores, 3).nonzero().flatten().tolist() == [1, 2, 3]
    assert top_k_mask(scores, 0).sum() == 0
    assert top_k_mask(scores, 7).all()


def test_apportion_is_exact_and_respects_caps() -> None:
    counts = apportion(10, [1.0, 1.0, 1.0], [100, 100, 100])
    assert counts == [4, 3, 3]
    assert apportion(10, [100.0, 1.0, 1.0], [2, 100, 100]) == [2, 4, 4]
    with pytest.raises(ValueError, match="cannot place"):
        apportion(10, [1.0], [5])


def test_erk_matches_hand_computation() -> None:
    # ERK: d_l ∝ density_l·D_l with density_l ∝ (Σ dims)/(Π dims), i.e. d_l ∝ Σ dims.
    shapes = [(10, 20), (30, 40), (5, 5)]
    counts = layer_counts("erk", shapes, 100, [200, 1200, 25])
    eps = 100 / (30 + 70 + 10)
    assert counts == [round(30 * eps), round(70 * eps), round(10 * eps)] == [27, 64, 9]
    assert layer_counts("global", shapes, 100, [200, 1200, 25]) is None


def test_uniform_budget_gives_exact_total_and_equal_density() -> None:
    targets = _targets((16, 32), (8, 64), (4, 4))
    indices = _indices(targets, RandomConfig(density=0.25))
    assert [len(i) for i in indices] == [128, 128, 4]


def test_global_magnitude_is_the_exact_global_top_k() -> None:
    targets = _targets((16, 32), (8, 64))
    indices = _indices(targets, MagnitudeConfig(num_trainable=50, budget="global"))
    all_scores = torch.cat([t.weight.detach().abs().flatten() for t in targets])
    threshold = all_scores.sort(descending=True).values[49]
    chosen = torch.cat([t.weight.detach().abs().flatten()[i] for t, i in zip(targets, indices, strict=True)])
    assert len(chosen) == 50 and (chosen >= threshold).all()


def test_per_layer_magnitude_keeps_the_largest() -> None:
    targets = _targets((6, 10))
    (idx,) = _indices(targets, MagnitudeConfig(num_trainable=7))
    scores = targets[0].weight.detach().abs().flatten()
    assert set(idx.tolist()) == set(scores.argsort(descending=True)[:7].tolist())


def test_rows_structure_selects_whole_rows_by_mean_score() -> None:
    targets = _targets((8, 10))
    (idx,) = _indices(targets, MagnitudeConfig(density=0.25, structure="rows"))
    rows = (idx // 10).unique()
    assert len(idx) == 20 and len(rows) == 2
    expected = targets[0].weight.detach().abs().mean(1).argsort(descending=True)[:2].sort().values
    assert rows.tolist() == expected.tolist()


def test_rows_global_covers_the_budget_with_whole_rows() -> None:
    targets = _targets((8, 10), (4, 20))
    indices = _indices(targets, MagnitudeConfig(num_trainable=45, budget="global", structure="rows"))
    for t, idx in zip(targets, indices, strict=True):
        width = t.weight.shape[1]
        assert len(idx) % width == 0
    assert sum(len(i) for i in indices) >= 45


def test_nm_structure_keeps_at_most_n_per_block() -> None:
    targets = _targets((6, 16))
    (idx,) = _indices(targets, MagnitudeConfig(density=0.5, structure="2:4"))
    mask = torch.zeros(96, dtype=torch.bool)
    mask[idx] = True
    per_block = mask.reshape(6, 4, 4).sum(-1)
    assert (per_block == 2).all()
    # the two kept in each block are that block's two largest magnitudes
    blocks = targets[0].weight.detach().abs().reshape(6, 4, 4)
    assert torch.equal(nm_candidates(blocks.reshape(6, 16), 2, 4, "x"), mask.reshape(6, 16))
    (sparser,) = _indices(targets, MagnitudeConfig(density=0.25, structure="2:4"))
    sparse_mask = torch.zeros(96, dtype=torch.bool)
    sparse_mask[sparser] = True
    assert len(sparser) == 24 and (sparse_mask.reshape(6, 4, 4).sum(-1) <= 2).all()
    assert not (sparse_mask & ~mask).any()


def test_nm_structure_bad_inputs() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        _indices(_targets((6, 10)), MagnitudeConfig(density=0.5, structure="2:4"))
    with pytest.raises(ValueError, match="exceeds what structure='2:4' allows"):
        _indices(_targets((6, 16)), MagnitudeConfig(density=0.75, structure="2:4"))


def test_random_mask_is_seeded_and_independent_of_other_targets() -> None:
    a = _indices(_targets((16, 32), (8, 8)), RandomConfig(density=0.1, seed=5))
    b = _indices(_targets((16, 32), seed=1), RandomConfig(density=0.1, seed=5))
    c = _indices(_targets((16, 32)), RandomConfig(density=0.1, seed=6))
    assert torch.equal(a[0], b[0])
    assert not torch.equal(a[0], c[0])


def test_conv1d_masks_follow_the_input_dimension() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    module = Conv1D(6, 8)  # weight [in=8, out=6]
    (idx,) = _indices([Target("c", module, weight_op(module))], MagnitudeConfig(density=0.5, structure="2:4"))
    mask = torch.zeros(48, dtype=torch.bool)
    mask[idx] = True
    # blocks of 4 run along the input dimension, which is dim 0 of a Conv1D weight
    assert (mask.reshape(8, 6).t().reshape(6, 2, 4).sum(-1) == 2).all()


def test_concentration_counts_rows_and_columns_as_by_hand() -> None:
    from drt_peft.masks.statistics import concentration, mask_statistics

    row_zero_and_one = torch.tensor([0, 1, 2, 3, 4, 7])  # all of row 0 of a 4 × 5 weight, and (1, 2)
    assert concentration(row_zero_and_one, (4, 5)) == pytest.approx(
        {"top_rows_share": 5 / 6, "rows_touched": 2 / 4, "columns_touched": 5 / 5}
    )
    one_column = torch.tensor([3, 8, 13])  # column 3 of rows 0, 1 and 2 of a 200 × 5 weight: top 2 rows of 200
    assert concentration(one_column, (200, 5)) == pytest.approx(
        {"top_rows_share": 2 / 3, "rows_touched": 3 / 200, "columns_touched": 1 / 5}
    )
    stats = mask_statistics(["a", "b"], [row_zero_and_one, one_column], [(4, 5), (200, 5)], per_layer=True)
    assert stats["drt/largest_layer_share"] == pytest.approx(6 / 9)
    assert stats["drt/columns_touched"] == pytest.approx((6 * 1.0 + 3 * 0.2) / 9)
    assert stats["drt/top_rows_share/b"] == pytest.approx(2 / 3)
    assert mask_statistics(["a"], [torch.empty(0, dtype=torch.int64)], [(4, 5)]) == {}


def test_drt_statistics_show_how_a_mask_concentrates() -> None:
    from drt_peft import get_drt_model

    model = get_drt_model(tiny_mlp((64, 64, 4)), RandomConfig(density=0.05, target_modules=["0"]))
    layer = dict(model.drt_layers())["0"]
    with torch.no_grad():  # the same d, all in the first rows: a concentrated mask
        layer.update_indices(torch.arange(layer.num_trainable))
    stats = model.drt_statistics(per_layer=True)
    assert stats["drt/top_rows_share"] == pytest.approx(64 / layer.num_trainable)
    assert stats["drt/rows_touched/0"] == pytest.approx(4 / 64) and stats["drt/columns_touched"] == 1.0
