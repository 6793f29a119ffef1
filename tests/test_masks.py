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
        {
            "top_rows_share": 5 / 6,
            "rows_touched": 2 / 4,
            "columns_touched": 5 / 5,
            "max_row_density": 5 / 5,
            "max_column_density": 2 / 4,
        }
    )
    one_column = torch.tensor([3, 8, 13])  # column 3 of rows 0, 1 and 2 of a 200 × 5 weight: top 2 rows of 200
    assert concentration(one_column, (200, 5)) == pytest.approx(
        {
            "top_rows_share": 2 / 3,
            "rows_touched": 3 / 200,
            "columns_touched": 1 / 5,
            "max_row_density": 1 / 5,
            "max_column_density": 3 / 200,
        }
    )
    stats = mask_statistics(["a", "b"], [row_zero_and_one, one_column], [(4, 5), (200, 5)], per_layer=True)
    assert stats["drt/largest_layer_share"] == pytest.approx(6 / 9)
    assert stats["drt/columns_touched"] == pytest.approx((6 * 1.0 + 3 * 0.2) / 9)
    assert stats["drt/top_rows_share/b"] == pytest.approx(2 / 3)
    # the densest row and column over all layers, not a mean
    assert (stats["drt/max_row_density"], stats["drt/max_column_density"]) == (1.0, 0.5)
    assert stats["drt/max_row_density/b"] == pytest.approx(1 / 5)
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


# -- concentration controls: per-layer score normalisation, row and column caps ------------------------------------
def _greedy(scores: list[torch.Tensor], k: int, caps: list[tuple[int, int]]) -> list[torch.Tensor]:
    """The capped selection written out: all entries in descending score order (ties: lower position, matrices in
    order), each taken unless its row or column already holds its cap, until k are taken."""
    entries = sorted(
        ((float(v), layer, i) for layer, s in enumerate(scores) for i, v in enumerate(s.flatten().tolist())),
        key=lambda e: (-e[0], e[1], e[2]),
    )
    rows: dict[tuple[int, int], int] = {}
    columns: dict[tuple[int, int], int] = {}
    masks = [torch.zeros(s.numel(), dtype=torch.bool) for s in scores]
    taken = 0
    for _, layer, i in entries:
        if taken == k:
            break
        row, column = divmod(i, scores[layer].shape[1])
        per_row, per_column = caps[layer]
        if rows.get((layer, row), 0) < per_row and columns.get((layer, column), 0) < per_column:
            rows[layer, row] = rows.get((layer, row), 0) + 1
            columns[layer, column] = columns.get((layer, column), 0) + 1
            masks[layer][i] = True
            taken += 1
    return [m.reshape(s.shape) for m, s in zip(masks, scores, strict=True)]


def test_capped_selection_is_the_greedy_under_both_caps_and_the_top_k_without_them() -> None:
    from drt_peft.masks.selection import capped_top_k, select_capped

    g = torch.Generator().manual_seed(0)
    scores = [torch.randint(0, 30, (7, 9), generator=g).float(), torch.rand(5, 12, generator=g) * 30]  # with ties
    caps = [(2, 3), (4, 1)]
    for k in (0, 1, 17, 26):  # 26 = 14 + 12: both layers full (7·2 rows, 12·1 columns)
        got = capped_top_k(scores, k, caps)
        assert all(torch.equal(a, b) for a, b in zip(got, _greedy(scores, k, caps), strict=True)), k
        assert sum(int(m.sum()) for m in got) == k
        for m, (per_row, per_column) in zip(got, caps, strict=True):
            assert m.sum(1).max() <= per_row and m.sum(0).max() <= per_column
    per_layer = select_capped(scores, [10, 6], 16, caps)
    assert [int(m.sum()) for m in per_layer] == [10, 6]
    assert torch.equal(per_layer[1], _greedy(scores[1:], 6, caps[1:])[0])
    # no binding cap: exactly top_k_mask, ties included
    free = [(9, 7), (12, 5)]
    joint = torch.cat([s.flatten() for s in scores])
    assert torch.equal(torch.cat([m.flatten() for m in capped_top_k(scores, 40, free)]), top_k_mask(joint, 40))


def test_capped_selection_widens_past_its_first_prefix_and_counts_held_entries() -> None:
    from drt_peft.masks.selection import capped_top_k

    g = torch.Generator().manual_seed(1)
    scores = [torch.rand(300, 300, generator=g) + torch.arange(300).flip(0)[:, None]]  # each row above the next
    caps = [(1, 300)]
    (got,) = capped_top_k(scores, 250, caps)  # the first 65,536 entries of the order lie in rows 0-218 only
    assert torch.equal(got, _greedy(scores, 250, caps)[0])
    assert got.sum(1)[:250].eq(1).all() and not got[250:].any()
    held = torch.zeros(300, 300, dtype=torch.bool)
    held[:10, 0] = True  # rows 0-9 are full already
    (grown,) = capped_top_k(scores, 5, caps, held=[held])
    assert not (grown & held).any() and int(grown.sum()) == 5 and grown.sum(1)[10:15].eq(1).all()
    assert torch.equal(grown[10:15].float().argmax(1), scores[0][10:15].argmax(1))


def test_a_row_cap_spills_to_the_next_best_entries_of_the_layer_and_keeps_d() -> None:
    targets = _targets((4, 10), (4, 10))
    with torch.no_grad():  # one loud row per layer: row 0 holds the ten largest magnitudes of each layer
        for t in targets:
            t.weight.copy_(torch.arange(40, dtype=torch.float32).flip(0).reshape(4, 10) / 100)
            t.weight[0] += 1.0
    plain = _indices(targets, MagnitudeConfig(density=0.25))  # 10 per layer: all of row 0
    assert [i.tolist() for i in plain] == [list(range(10))] * 2
    capped = _indices(targets, MagnitudeConfig(density=0.25, max_row_density=0.3))  # at most 3 per row of 10
    # by hand: row 0's three best (0, 1, 2), row 1's three best (10, 11, 12), row 2's three, then row 3's best
    assert [i.tolist() for i in capped] == [[0, 1, 2, 10, 11, 12, 20, 21, 22, 30]] * 2
    # globally the budget spills over all layers: 20 entries, at most 3 per row of either layer
    both = _indices(targets, MagnitudeConfig(num_trainable=20, budget="global", max_row_density=0.3))
    assert sum(len(i) for i in both) == 20
    assert all(torch.bincount(i // 10).max() <= 3 for i in both)
    columns = _indices(targets, MagnitudeConfig(density=0.25, max_column_density=0.25))  # 1 per column of 4 rows
    assert [i.tolist() for i in columns] == [list(range(10))] * 2  # row 0 already uses every column once
    (one_per_row,) = _indices(_targets((2, 10)), MagnitudeConfig(density=0.1, max_row_density=0.05))
    assert torch.bincount(one_per_row // 10).tolist() == [1, 1]  # ⌊0.05·10⌋ = 0, but a cap keeps at least one
    with pytest.raises(ValueError, match=r"gives a layer of shape \(1, 6\) 2 trained entries, more than the 1"):
        _indices(_targets((10, 10), (1, 6)), MagnitudeConfig(density=0.25, max_row_density=0.3))  # ⌊0.3·6⌋ = 1
    with pytest.raises(ValueError, match=r"d=20 trained entries exceed the 16 that"):
        _indices(targets, MagnitudeConfig(num_trainable=20, budget="global", max_row_density=0.2))


def test_layer_normalisation_ranks_each_layer_on_its_own_scale() -> None:
    from drt_peft.masks.budgets import normalise_layer

    targets = _targets((8, 8), (8, 8))
    with torch.no_grad():
        targets[0].weight.mul_(1000.0)  # a loud layer takes the whole global budget
    loud = _indices(targets, MagnitudeConfig(num_trainable=20, budget="global"))
    assert [len(i) for i in loud] == [20, 0]
    fair = _indices(targets, MagnitudeConfig(num_trainable=20, budget="global", score_normalisation="layer"))
    scaled = [t.weight.detach().abs() / t.weight.detach().abs().double().mean() for t in targets]  # by hand
    expected = top_k_mask(torch.cat([s.flatten() for s in scaled]).float(), 20).split(64)
    assert [i.tolist() for i in fair] == [e.nonzero().flatten().tolist() for e in expected]
    assert 0 < len(fair[1]) < 20
    assert torch.equal(normalise_layer(torch.zeros(3)), torch.zeros(3))


def test_drt_statistics_show_what_the_controls_change() -> None:
    from drt_peft import get_drt_model

    def stats(**fields: object) -> dict[str, float]:
        model = tiny_mlp((64, 64, 16))
        with torch.no_grad():
            model[0].weight.mul_(100.0)
            model[0].weight[:2] += 100.0  # its first two rows are the loudest of all
        return get_drt_model(model, MagnitudeConfig(num_trainable=256, **fields)).drt_statistics(per_layer=True)

    loud = stats(budget="global")
    assert loud["drt/largest_layer_share"] == 1.0 and loud["drt/max_row_density"] == 1.0
    normalised = stats(budget="global", score_normalisation="layer")
    assert normalised["drt/largest_layer_share"] < 1.0
    capped = stats(budget="global", max_row_density=0.125, max_column_density=0.25)
    assert capped["drt/trainable"] == 256
    assert capped["drt/max_row_density"] <= 0.125 and capped["drt/max_column_density"] <= 0.25
    assert capped["drt/top_rows_share"] < loud["drt/top_rows_share"]


@pytest.mark.parametrize(
    ("config", "kwargs", "message"),
    [
        ("random", {"score_normalisation": "norm"}, r"score_normalisation='norm' is not supported; use one of"),
        ("random", {"score_normalisation": "layer"}, r"score_normalisation='layer' is not supported with budget="),
        ("random", {"max_row_density": 0}, r"max_row_density=0 must be a fraction with 0 < max_row_density <= 1"),
        ("random", {"max_column_density": 1.5}, r"max_column_density=1\.5 must be a fraction"),
        ("random", {"max_row_density": 0.1, "structure": "2:4"}, r"not supported with structure='2:4'"),
        ("supermask", {"max_column_density": 0.1}, r"max_column_density=0\.1 is not supported by 'supermask'"),
    ],
)
def test_concentration_controls_are_validated(config: str, kwargs: dict, message: str) -> None:
    from drt_peft.config import config_class

    with pytest.raises(ValueError, match=message):
        config_class(config)(density=0.1, **kwargs)
