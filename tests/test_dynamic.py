"""Changing ψ on a live layer (the step every dynamic method shares) and SET on top of it."""

from __future__ import annotations

import copy
import math
import re
import warnings
from collections.abc import Callable

import pytest
import torch
from conftest import (
    Parity,
    adamw,
    assert_save_load_roundtrip,
    cpu_training_args,
    random_bert_batch,
    tiny_bert,
    tiny_mlp,
    train_updating_masks,
)
from torch import nn
from transformers.pytorch_utils import Conv1D

from drt_peft import DRTCallback, DRTLayer, DRTModel, DRTTrainer, RigLConfig, SETConfig, get_drt_model
from drt_peft.layer.frozen_decay import FrozenDecayLayer
from drt_peft.masks.dynamic import drop_weights, regrow, smallest_magnitudes
from drt_peft.topk import top_k_mask


def _layer(mode: str, d: int = 6, decaying: bool = False) -> tuple[DRTLayer, torch.Tensor]:
    """A 4 × 5 layer with ψ of ``d`` random entries; ``decaying``: a freeze-mode layer whose frozen entries decay."""
    torch.manual_seed(0)
    linear = nn.Linear(5, 4)
    original = linear.weight.detach().clone()
    indices = torch.randperm(20, generator=torch.Generator().manual_seed(0))[:d].sort().values
    return (FrozenDecayLayer(linear, indices) if decaying else DRTLayer(linear, indices, mode)), original


@pytest.mark.parametrize("mode", ["freeze", "prune"])
@pytest.mark.parametrize("optimizer_class", [torch.optim.AdamW, torch.optim.SGD])
def test_update_indices_keeps_values_and_state_and_resets_grown(mode: str, optimizer_class) -> None:
    layer, original = _layer(mode, decaying=mode == "freeze")
    kwargs = {"momentum": 0.9} if optimizer_class is torch.optim.SGD else {}
    optimizer = optimizer_class([layer.drt_values], lr=0.1, **kwargs)
    x = torch.randn(3, 5)
    for _ in range(2):
        layer(x).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    if mode == "freeze":
        layer.decay_frozen(0.5)
    old_indices, old_values = layer.drt_indices.clone(), layer.drt_values.detach().clone()
    old_state = {k: v.clone() for k, v in optimizer.state[layer.drt_values].items() if v.shape == old_values.shape}
    new_indices = (
        torch.cat([old_indices[:3], torch.tensor([i for i in range(20) if i not in old_indices][:4])]).sort().values
    )
    parameter = layer.drt_values
    layer.update_indices(new_indices, optimizer)

    assert layer.drt_values is parameter and layer.num_trainable == 7
    kept = torch.isin(new_indices, old_indices)
    assert torch.equal(layer.drt_values[kept], old_values[:3])
    grown_start = original.reshape(-1)[new_indices[~kept]] * 0.5 if mode == "freeze" else torch.zeros(4)
    assert torch.allclose(layer.drt_values[~kept].detach(), grown_start)
    state = optimizer.state[layer.drt_values]
    assert old_state and all(
        torch.equal(state[k][kept], v[:3]) and (state[k][~kept] == 0).all() for k, v in old_state.items()
    )
    expected = (original * (0.5 if mode == "freeze" else 0.0)).reshape(-1)
    expected[new_indices] = layer.drt_values.detach()
    assert torch.allclose(layer.effective_weight().reshape(-1), expected)
    assert torch.allclose(layer(x), x @ expected.reshape(4, 5).t() + layer.base_layer.bias)
    layer(x).sum().backward()
    optimizer.step()  # the optimizer keeps working on the resized parameter
    if mode == "freeze":
        assert torch.equal(layer.unload().weight, original)


@pytest.mark.parametrize("mode", ["freeze", "prune"])
@pytest.mark.parametrize("capture", [False, True])
def test_resized_values_train_while_an_old_graph_is_alive(mode: str, capture: bool) -> None:
    layer, _ = _layer(mode)
    layer.capture_dense_grad = capture
    optimizer = torch.optim.AdamW([layer.drt_values], lr=0.1)
    x = torch.randn(3, 5)
    kept_alive = layer(x).pow(2).sum()  # holds the gradient accumulator of ϑ at d = 6
    kept_alive.backward()
    optimizer.step()
    for indices in ([0, 2, 4, 6, 8, 10, 12, 14, 16], [3, 4, 5]):  # d = 9, then d = 3
        layer.update_indices(torch.tensor(indices), optimizer)
        out = layer(x).pow(2).sum()
        out.backward()
        assert layer.drt_values.grad.shape == (len(indices),)
        optimizer.step()
        state = optimizer.state[layer.drt_values]
        assert state["exp_avg"].shape == state["exp_avg_sq"].shape == (len(indices),)
        kept_alive = out
    weight = layer.effective_weight().detach().clone().requires_grad_(True)
    (x @ weight.t() + layer.base_layer.bias).pow(2).sum().backward()
    layer.drt_values.grad = None
    layer(x).pow(2).sum().backward()
    assert torch.allclose(layer.drt_values.grad, weight.grad.reshape(-1)[layer.drt_indices])


def test_regrow_keeps_the_gradient_accumulator_ddp_hooks_into() -> None:
    layer, _ = _layer("prune", d=8)
    accumulator = torch.autograd.graph.get_gradient_edge(layer.drt_values).node  # DDP holds these from wrap time
    fired = []
    accumulator.register_hook(lambda *_: fired.append(True))
    regrow(layer, smallest_magnitudes(layer, 2), 2, torch.rand(4, 5, generator=torch.Generator().manual_seed(0)), None)
    layer(torch.randn(3, 5)).sum().backward()
    assert fired, "a same-size update must not replace the accumulator (DDP would stop reducing ϑ)"


def test_update_indices_fresh_restarts_kept_entries() -> None:
    layer, original = _layer("freeze")
    optimizer = torch.optim.AdamW([layer.drt_values], lr=0.1)
    layer(torch.randn(3, 5)).sum().backward()
    optimizer.step()
    indices = layer.drt_indices.clone()
    values, exp_avg = layer.drt_values.detach().clone(), optimizer.state[layer.drt_values]["exp_avg"].clone()
    fresh = torch.tensor([True, False, False, False, False, True])
    layer.update_indices(indices, optimizer, fresh=fresh)
    assert torch.equal(layer.drt_values.detach()[fresh], original.reshape(-1)[indices[fresh]])
    assert torch.equal(layer.drt_values.detach()[~fresh], values[~fresh])
    state = optimizer.state[layer.drt_values]["exp_avg"]
    assert (state[fresh] == 0).all() and torch.equal(state[~fresh], exp_avg[~fresh])
    with pytest.raises(ValueError, match="fresh has shape"):
        layer.update_indices(indices, optimizer, fresh=fresh[:3])


def test_regrow_drops_smallest_and_grows_largest_scores() -> None:
    layer, _ = _layer("prune", d=8)
    with torch.no_grad():
        layer.drt_values.copy_(torch.tensor([5.0, -0.1, 3.0, 0.2, -4.0, 0.05, 2.0, 1.0]))
    before = layer.drt_indices.clone()
    scores = torch.arange(20, dtype=torch.float32).reshape(4, 5)
    regrow(layer, smallest_magnitudes(layer, 2), 2, scores, None)
    assert layer.num_trainable == 8
    dropped = set(before[[5, 1]].tolist())
    assert not dropped & set(layer.drt_indices.tolist())
    untrained_after_drop = [i for i in range(20) if i not in set(before.tolist()) - dropped]
    assert set(layer.drt_indices.tolist()) - set(before.tolist()) == set(sorted(untrained_after_drop)[-2:])


def test_regrow_grows_exactly_as_many_when_scores_hold_nan_and_inf() -> None:
    layer, _ = _layer("prune", d=8)
    scores = torch.full((4, 5), float("nan"))
    scores.view(-1)[[3, 7]] = torch.tensor([float("inf"), 1.0])
    kept_before = layer.drt_indices.clone()
    regrow(layer, smallest_magnitudes(layer, 3), 3, scores, None)
    grown = set(layer.drt_indices.tolist()) - set(kept_before.tolist())
    assert layer.num_trainable == 8 and len(set(layer.drt_indices.tolist())) == 8
    assert {3, 7} - set(kept_before.tolist()) <= grown  # the finite and +inf scores grow first


def _capped_case(kind: str) -> tuple[DRTLayer, Callable[[list[int]], list[int]]]:
    """A prune-mode layer whose ``[out=4, fan_in=5]`` view trains two entries in each row (columns 0 and 1, by
    matrix-flat position 0, 1, 5, 6, 10, 11, 15, 16), those at 0 and 5 the smallest; and the map from
    matrix-flat positions to the weight's own flat layout (``kind``: an ``nn.Linear``, or transformers' ``Conv1D``,
    whose weight is ``[in, out]``)."""
    module = nn.Linear(5, 4) if kind == "linear" else Conv1D(4, 5)

    def to_weight(positions: list[int]) -> list[int]:
        return positions if kind == "linear" else [(p % 5) * 4 + p // 5 for p in positions]

    positions = [0, 1, 5, 6, 10, 11, 15, 16]
    layer = DRTLayer(module, torch.tensor(sorted(to_weight(positions))), "prune")
    small = set(to_weight([0, 5]))
    with torch.no_grad():
        layer.drt_values.copy_(torch.tensor([0.1 if i in small else 5.0 for i in layer.drt_indices.tolist()]))
    return layer, to_weight


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize(
    ("caps", "grown"),
    [
        (None, [18, 19]),  # the loudest row, which then trains all four inputs it holds
        ((2, 4), [4, 9]),  # rows 2 and 3 are full: the best entries of rows 0 and 1
        ((2, 1), [3, 9]),  # one per column too: 4 shares column 4 with 9, so row 0 takes 3
    ],
)
def test_regrow_keeps_row_and_column_caps_on_the_matrix_view(kind: str, caps, grown: list[int]) -> None:
    layer, to_weight = _capped_case(kind)
    scores = layer.op.from_matrix(torch.arange(20, dtype=torch.float32).reshape(4, 5))  # matrix position = score
    before = set(layer.drt_indices.tolist())
    regrow(layer, smallest_magnitudes(layer, 2), 2, scores, None, caps=caps)
    assert layer.num_trainable == 8
    assert set(layer.drt_indices.tolist()) - before == set(to_weight(grown))
    if caps is not None:
        matrix = layer.op.to_matrix(layer.get_mask())
        assert int(matrix.sum(1).max()) <= caps[0] and int(matrix.sum(0)[2:].max()) <= caps[1]  # columns 0, 1 held


def test_regrow_keeps_d_exact_where_the_caps_leave_too_little_room() -> None:
    layer, _ = _capped_case("linear")
    regrow(layer, smallest_magnitudes(layer, 2), 2, torch.arange(20.0).reshape(4, 5), None, caps=(1, 1))
    assert layer.num_trainable == 8 and len(set(layer.drt_indices.tolist())) == 8


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_dynamic_methods_keep_line_caps_through_training(method: str) -> None:
    config_class = SETConfig if method == "set" else RigLConfig
    config = config_class(density=0.2, update_frequency=2, drop_fraction=0.5, t_end=8, max_row_density=0.3,
                          max_column_density=0.4)  # fmt: skip
    model = get_drt_model(tiny_bert(), config)
    start = {name: layer.num_trainable for name, layer in model.drt_layers()}
    g = torch.Generator().manual_seed(3)
    _, logs = train_updating_masks(model, [random_bert_batch(g) for _ in range(8)])
    assert sum(entry.get("drt/moved", 0) for entry in logs) > 0
    for name, layer in model.drt_layers():
        matrix = layer.op.to_matrix(layer.get_mask())
        out, fan_in = matrix.shape
        assert layer.num_trainable == start[name]
        assert int(matrix.sum(1).max()) <= max(1, math.floor(0.3 * fan_in + 1e-9))
        assert int(matrix.sum(0).max()) <= max(1, math.floor(0.4 * out + 1e-9))


def _train_set(steps: int, seed: int = 0) -> tuple[DRTModel, list[dict]]:
    model = get_drt_model(tiny_bert(), SETConfig(density=0.2, update_frequency=2, drop_fraction=0.25, seed=seed))
    g = torch.Generator().manual_seed(4)
    _, logs = train_updating_masks(model, [random_bert_batch(g) for _ in range(steps)])
    return model, logs


def test_set_keeps_d_exact_is_deterministic_and_round_trips(tmp_path) -> None:
    start = {
        n: layer.drt_indices.clone() for n, layer in get_drt_model(tiny_bert(), SETConfig(density=0.2)).drt_layers()
    }
    model, logs = _train_set(6)
    again, _ = _train_set(6)
    assert [bool(entry) for entry in logs] == [False, True, False, True, False, True]
    for (name, layer), (_, other) in zip(model.drt_layers(), again.drt_layers(), strict=True):
        assert layer.num_trainable == start[name].numel()
        assert torch.equal(layer.drt_indices, other.drt_indices)
    assert any(not torch.equal(layer.drt_indices, start[name]) for name, layer in model.drt_layers())
    ids = {"input_ids": torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(9))}
    assert_save_load_roundtrip(model, tiny_bert(), ids, tmp_path)


def test_dynamic_config_bad_inputs() -> None:
    with pytest.raises(ValueError, match="update_frequency=0 must be a positive integer"):
        SETConfig(density=0.1, update_frequency=0)
    with pytest.raises(ValueError, match=r"drop_fraction=1\.0 must satisfy 0 < drop_fraction < 1"):
        SETConfig(density=0.1, drop_fraction=1.0)
    with pytest.raises(ValueError, match="structure='2:4' is not supported by 'set'"):
        SETConfig(density=0.1, structure="2:4")


def test_dense_gradient_capture_matches_dense_autograd() -> None:
    layer, original = _layer("freeze", d=6)
    layer.capture_dense_grad = True
    xs = [torch.randn(3, 5), torch.randn(2, 5)]
    for x in xs:
        layer(x).pow(2).sum().backward()
    weight = original.clone().requires_grad_(True)
    for x in xs:
        (x @ weight.t() + layer.base_layer.bias).pow(2).sum().backward()
    assert torch.allclose(layer.dense_grad, weight.grad)
    assert torch.allclose(layer.drt_values.grad, weight.grad.reshape(-1)[layer.drt_indices])


def test_rigl_cosine_schedule_and_bad_inputs() -> None:
    config = RigLConfig(density=0.1, drop_fraction=0.4, t_end=100)
    assert config.drop_fraction_at(0) == pytest.approx(0.4)
    assert config.drop_fraction_at(50) == pytest.approx(0.2)
    assert config.drop_fraction_at(25) == pytest.approx(0.2 * (1 + math.cos(math.pi / 4)))
    assert config.drop_fraction_at(100) == pytest.approx(0.0)
    decay = r"t_end=None: RigLConfig's drop fraction decays to 0 at t_end \(α_t = α/2 · \(1 \+ cos"
    with pytest.raises(ValueError, match=decay):
        RigLConfig(density=0.1)


def test_rigl_grows_where_the_dense_gradient_is_largest() -> None:
    model = get_drt_model(tiny_bert(), RigLConfig(density=0.2, update_frequency=2, drop_fraction=0.5, t_end=6))
    optimizer = adamw(model, lr=1e-2)
    layers = dict(model.drt_layers())
    g = torch.Generator().manual_seed(5)
    model.train()
    for step in (1, 2):
        batch = random_bert_batch(g)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        armed = all(layer.capture_dense_grad for layer in layers.values())
        assert armed == (step == 2), "the capture is armed only for the backward of an update step"
        if step == 2:
            before = {
                n: (layer.drt_indices.clone(), layer.drt_values.detach().abs(), layer.dense_grad.abs())
                for n, layer in layers.items()
            }
        logs = model.update_masks(step, optimizer)
    assert logs["drt/drop_fraction"] == pytest.approx(0.25 * (1 + math.cos(math.pi * 2 / 6)))
    for name, layer in layers.items():
        indices, magnitudes, grad = before[name]
        k = round(logs["drt/drop_fraction"] * indices.numel())
        assert layer.num_trainable == indices.numel() and layer.dense_grad is None and not layer.capture_dense_grad
        kept = indices[magnitudes.argsort(stable=True)[k:]]
        scores = grad.reshape(-1).clone()
        scores[kept] = -1
        grown = set(layer.drt_indices.tolist()) - set(kept.tolist())
        assert len(grown) == k
        assert min(scores[list(grown)].tolist(), default=0) >= scores.sort(descending=True).values[k - 1] - 1e-12
        state = optimizer.state[layer.drt_values]
        fresh = ~torch.isin(layer.drt_indices, indices)  # entries dropped and grown again keep their state
        assert (state["exp_avg"][fresh] == 0).all() and (state["exp_avg_sq"][fresh] == 0).all()


def test_rigl_without_the_update_hook_fails_clearly() -> None:
    model = get_drt_model(tiny_bert(), RigLConfig(density=0.2, update_frequency=1, t_end=5))
    optimizer = adamw(model)
    with pytest.raises(RuntimeError, match="captured no dense gradient"):
        model.update_masks(1, optimizer)


def test_exploration_rate_counts_every_position_ever_trained() -> None:
    model = get_drt_model(tiny_mlp(), SETConfig(density=0.25, update_frequency=1, drop_fraction=0.5))
    optimizer = adamw(model)
    layers = list(model.drt_layers())
    seen = [set(layer.drt_indices.tolist()) for _, layer in layers]
    total = sum(layer.base_layer.weight.numel() for _, layer in layers)
    for step in range(1, 5):
        model(torch.randn(4, 6)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        assert model.update_masks(step, optimizer)["drt/moved"] > 0
        for positions, (_, layer) in zip(seen, layers, strict=True):
            positions |= set(layer.drt_indices.tolist())
        explored = model.drt_statistics()["drt/itop_exploration"]
        assert explored == pytest.approx(sum(len(positions) for positions in seen) / total)
    for i, (positions, (_, layer)) in enumerate(zip(seen, layers, strict=True)):
        bitmap = getattr(model.drt_policy, f"explored_{i}")
        bits = [(int(bitmap[j // 8]) >> (j % 8)) & 1 for j in range(layer.base_layer.weight.numel())]
        assert {j for j, bit in enumerate(bits) if bit} == positions


@pytest.mark.parametrize("per_layer", [False, True])
def test_drt_trainer_logs_densities_and_exploration(tmp_path, per_layer: bool) -> None:
    model = get_drt_model(tiny_bert(), SETConfig(density=0.2, update_frequency=2, drop_fraction=0.3))
    args = cpu_training_args(tmp_path, per_device_train_batch_size=8, max_steps=8, logging_steps=2, learning_rate=1e-2)
    callbacks = [DRTCallback(log_per_layer=True)] if per_layer else None
    trainer = DRTTrainer(model=model, args=args, train_dataset=Parity(64), callbacks=callbacks)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    rates = [entry["drt/itop_exploration"] for entry in logged]
    assert len(logged) == 4 and rates == sorted(rates) and rates[-1] > rates[0] > 0.19
    density = 0.2
    assert all(abs(entry["drt/density"] - density) < 0.01 for entry in logged)
    assert all(entry["drt/density_min"] <= entry["drt/density"] <= entry["drt/density_max"] for entry in logged)
    per_layer_keys = [key for key in logged[0] if key.startswith("drt/density/")]
    if per_layer:  # one key per embedded layer, on request only
        assert len(per_layer_keys) == len(list(model.drt_layers()))
        assert any(key.startswith("drt/density/bert.encoder.layer.0") for key in per_layer_keys)
    else:
        assert per_layer_keys == []


def test_missing_update_hook_warns_once() -> None:
    model = get_drt_model(tiny_bert(), SETConfig(density=0.2, update_frequency=2))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    g = torch.Generator().manual_seed(6)
    model.train()
    with pytest.warns(UserWarning, match=r"model\.update_masks\(step, optimizer\) has not been called for 5 backward"):
        for _ in range(5):
            model(**random_bert_batch(g)).loss.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(1, 8):  # with the hook, and past the warning point: silent
            model(**random_bert_batch(g)).loss.backward()
            model.update_masks(step, optimizer)


def test_t_end_beyond_the_trainer_length_is_refused(tmp_path) -> None:
    model = get_drt_model(tiny_bert(), RigLConfig(density=0.2, update_frequency=2, t_end=50))
    args = cpu_training_args(tmp_path, max_steps=10)
    with pytest.raises(ValueError, match=r"t_end=50 is beyond the training length \(max_steps=10\)"):
        DRTTrainer(model=model, args=args, train_dataset=Parity(16)).train()


def _mlp_model(config) -> tuple[DRTModel, torch.optim.Optimizer]:
    model = get_drt_model(tiny_mlp((6, 10, 4)), config)
    return model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)


def _mlp_step(model: DRTModel, optimizer: torch.optim.Optimizer, g: torch.Generator) -> None:
    x, y = torch.randn(5, 6, generator=g), torch.randint(0, 4, (5,), generator=g)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()


def test_snfs_momentum_and_redistribution_match_a_hand_computation() -> None:
    from drt_peft import SNFSConfig
    from drt_peft.masks.budgets import apportion

    config = SNFSConfig(
        density=0.3, update_frequency=3, drop_fraction=0.5, t_end=9, momentum=0.8, target_modules=["0", "2"]
    )
    model, optimizer = _mlp_model(config)
    layers = [layer for _, layer in model.drt_layers()]
    g = torch.Generator().manual_seed(7)
    d_total = sum(layer.num_trainable for layer in layers)
    momenta = [torch.zeros_like(layer.base_layer.weight) for layer in layers]
    for step in range(1, 4):
        _mlp_step(model, optimizer, g)
        momenta = [0.8 * m + 0.2 * layer.dense_grad for m, layer in zip(momenta, layers, strict=True)]
        if step == 3:
            before = [(layer.drt_indices.clone(), layer.drt_values.detach().abs()) for layer in layers]
        model.update_masks(step, optimizer)
    fraction = config.drop_fraction_at(3)
    kept, shares, caps, drops = [], [], [], 0
    for (indices, magnitudes), m in zip(before, momenta, strict=True):
        k = round(fraction * indices.numel())
        keep = indices[magnitudes.argsort(stable=True)[k:]]
        kept.append(keep)
        shares.append(float(m.reshape(-1)[indices].abs().mean()))  # over the entries trained before the drop
        caps.append(m.numel() - keep.numel())
        drops += k
    counts = apportion(drops, shares, caps)
    assert sum(layer.num_trainable for layer in layers) == d_total
    for i, (layer, keep, grow, m) in enumerate(zip(layers, kept, counts, momenta, strict=True)):
        assert torch.allclose(model.drt_policy.momentum(i), m)
        assert layer.num_trainable == keep.numel() + grow
        grown = sorted(set(layer.drt_indices.tolist()) - set(keep.tolist()))
        scores = m.abs().reshape(-1).clone()
        scores[keep] = -1
        assert grown == sorted(scores.argsort(descending=True, stable=True)[:grow].tolist())
    assert [layer.num_trainable for layer in layers] != [indices.numel() for indices, _ in before]


def test_dsr_threshold_adapts_and_regrowth_follows_kept_counts() -> None:
    from drt_peft import DSRConfig
    from drt_peft.masks.budgets import apportion

    config = DSRConfig(
        density=0.3, update_frequency=1, drop_fraction=0.2, initial_threshold=1e-9, target_modules=["0", "2"]
    )
    model, optimizer = _mlp_model(config)
    layers = [layer for _, layer in model.drt_layers()]
    g = torch.Generator().manual_seed(8)
    start = [layer.drt_indices.clone() for layer in layers]
    _mlp_step(model, optimizer, g)
    logs = model.update_masks(1, optimizer)
    assert logs["drt/moved"] == 0 and float(model.drt_policy.threshold) == pytest.approx(2e-9)
    assert all(torch.equal(a, layer.drt_indices) for a, layer in zip(start, layers, strict=True))
    with torch.no_grad():
        model.drt_policy.threshold.fill_(0.2)
    _mlp_step(model, optimizer, g)
    before = [(layer.drt_indices.clone(), layer.drt_values.detach().abs()) for layer in layers]
    d_total = sum(indices.numel() for indices, _ in before)
    logs = model.update_masks(2, optimizer)
    kept = [indices[magnitudes >= 0.2] for indices, magnitudes in before]
    dropped = d_total - sum(k.numel() for k in kept)
    assert logs["drt/moved"] == dropped > 0
    counts = apportion(
        dropped,
        [k.numel() for k in kept],
        [layer.base_layer.weight.numel() - k.numel() for layer, k in zip(layers, kept, strict=True)],
    )
    for layer, keep, grow in zip(layers, kept, counts, strict=True):
        assert set(keep.tolist()) <= set(layer.drt_indices.tolist())
        assert layer.num_trainable == keep.numel() + grow
    expected = 0.2 * (2 if dropped < 0.9 * 0.2 * d_total else 0.5 if dropped > 1.1 * 0.2 * d_total else 1)
    assert float(model.drt_policy.threshold) == pytest.approx(expected)


def _small_bert() -> nn.Module:
    """A wider BERT than tiny_bert's, with three classes, in train mode."""
    return tiny_bert(vocab_size=200, hidden_size=64, num_attention_heads=4, intermediate_size=128, num_labels=3).train()


def _bert_batch(g: torch.Generator) -> dict[str, torch.Tensor]:
    return random_bert_batch(g, size=16, length=12, vocab_size=200, num_labels=3)


@pytest.mark.parametrize("method", ["snfs", "dsr"])
@pytest.mark.parametrize(
    ("mode", "density"), [("freeze", 0.1), ("prune", 0.1), ("prune", 0.02)], ids=["freeze", "prune", "prune-csr"]
)
def test_redistributing_methods_train_on_while_layer_sizes_change(method: str, mode: str, density: float) -> None:
    """SNFS and DSR change d per layer; the loop below keeps ``loss`` (so its graph) alive across each
    update, as most loops do, and alternates train and eval mode: training must go on, d stay exact,
    Adam's state follow ψ, and Θ differ from Θ(0) (freeze) or 0 (prune) only at ψ."""
    from drt_peft import DSRConfig, SNFSConfig

    g = torch.Generator().manual_seed(3)
    common = {"density": density, "update_frequency": 2, "mode": mode, "target_modules": "all-linear"}
    config = (
        SNFSConfig(**common, drop_fraction=0.3, t_end=16)
        if method == "snfs"
        else DSRConfig(**common, drop_fraction=0.3, initial_threshold=1e-2)
    )
    base = _small_bert()
    originals = {
        name: module.weight.detach().clone() for name, module in base.named_modules() if isinstance(module, nn.Linear)
    }
    model = get_drt_model(base, config, calibration_data=[_bert_batch(g)])
    layers = dict(model.drt_layers())
    assert (mode == "prune" and density < 0.03) == any(layer.sparse_kernels for layer in layers.values())
    d_total = sum(layer.num_trainable for layer in layers.values())
    start_sizes = {name: layer.num_trainable for name, layer in layers.items()}
    optimizer = adamw(model, lr=1e-2)
    losses, updates = [], 0
    for step in range(1, 21):
        model.train(step % 3 != 0)
        loss = model(**_bert_batch(g)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        before = {name: layer.drt_indices.clone() for name, layer in layers.items()}
        logs = model.update_masks(step, optimizer)
        losses.append(loss.item())
        updates += logs.get("drt/moved", 0) > 0
        assert sum(layer.num_trainable for layer in layers.values()) == d_total, f"step {step}"
        for name, layer in layers.items():
            state = optimizer.state[layer.drt_values]
            assert state["exp_avg"].shape == state["exp_avg_sq"].shape == layer.drt_values.shape, name
            fresh = ~torch.isin(layer.drt_indices, before[name])
            assert (state["exp_avg"][fresh] == 0).all() and (state["exp_avg_sq"][fresh] == 0).all(), name
    assert updates >= 3 and all(math.isfinite(loss) for loss in losses)
    assert any(layer.num_trainable != start_sizes[name] for name, layer in layers.items())
    for name, layer in layers.items():
        on = layer.get_mask()
        effective = layer.effective_weight()
        outside = originals[name][~on] if mode == "freeze" else torch.zeros_like(effective[~on])
        assert torch.equal(effective[~on], outside), name
        assert torch.equal(effective.reshape(-1)[layer.drt_indices], layer.drt_values.detach()), name
        assert not torch.equal(effective[on], originals[name][on]), f"{name} did not train"
        if mode == "freeze":
            assert torch.equal(layer.base_layer.weight[~on], originals[name][~on]), name
    unloaded = model.unload()
    for name, weight in originals.items():
        assert torch.equal(unloaded.get_submodule(name).weight, weight), name


@pytest.mark.parametrize("method", ["set", "rigl", "snfs", "dsr"])
def test_a_non_finite_step_skips_the_mask_update_with_a_warning(method: str) -> None:
    from drt_peft import DSRConfig, SNFSConfig

    config = {
        "set": SETConfig(density=0.2, update_frequency=1),
        "rigl": RigLConfig(density=0.2, update_frequency=1, t_end=10),
        "snfs": SNFSConfig(density=0.2, update_frequency=1, t_end=10),
        "dsr": DSRConfig(density=0.2, update_frequency=1),
    }[method]
    model = get_drt_model(tiny_bert(), config)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    g = torch.Generator().manual_seed(0)
    model(**random_bert_batch(g)).loss.backward()
    optimizer.step()
    name, layer = next(iter(model.drt_layers()))
    with torch.no_grad():
        layer.drt_values[0] = float("nan")
        if method == "snfs":  # and a non-finite gradient, which must not reach the momentum
            layer.dense_grad.view(-1)[0] = float("inf")
    before = {n: other.drt_indices.clone() for n, other in model.drt_layers()}
    with pytest.warns(UserWarning) as caught:
        logs = model.update_masks(1, optimizer)
    said = [str(w.message) for w in caught]
    assert any(re.match(rf"step 1: the trained values of 1 layer\(s\) are not finite .*'{name}'", m) for m in said)
    assert any("SNFS leaves its momentum as it was" in m for m in said) == (method == "snfs")
    assert logs == {} and all(torch.equal(before[n], other.drt_indices) for n, other in model.drt_layers())
    if method == "snfs":
        momenta = [model.drt_policy.momentum(i) for i in range(len(before))]
        assert all(torch.equal(m, torch.zeros_like(m)) for m in momenta)


@pytest.mark.parametrize("mode", ["freeze", "prune"])
@pytest.mark.parametrize("keep_regrown", [False, True])
def test_an_entry_dropped_and_grown_again_restarts_or_keeps_its_value(mode: str, keep_regrown: bool) -> None:
    """By hand: ψ = {0, 1, 2, 3} of a 2 × 3 weight; the two smallest |ϑ| (positions 1 and 3) are dropped and
    two entries grown where the scores are largest, positions 3 (just dropped) and 5 (new)."""
    linear = nn.Linear(3, 2)
    original = linear.weight.detach().clone().reshape(-1)
    layer = DRTLayer(linear, torch.tensor([0, 1, 2, 3]), mode)
    optimizer = torch.optim.SGD([layer.drt_values], lr=0.1, momentum=0.9)
    with torch.no_grad():
        layer.drt_values.copy_(torch.tensor([2.0, 0.1, -3.0, -0.2]))
    optimizer.state[layer.drt_values]["momentum_buffer"] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    scores = torch.tensor([0.0, 0.0, 0.0, 9.0, 1.0, 8.0]).reshape(2, 3)
    regrow(layer, smallest_magnitudes(layer, 2), 2, scores, optimizer, keep_regrown=keep_regrown)

    assert layer.drt_indices.tolist() == [0, 2, 3, 5]
    start = (lambda i: float(original[i])) if mode == "freeze" else (lambda i: 0.0)
    regrown = -0.2 if keep_regrown else start(3)
    assert layer.drt_values.detach().tolist() == pytest.approx([2.0, -3.0, regrown, start(5)])
    momentum = optimizer.state[layer.drt_values]["momentum_buffer"]
    assert momentum.tolist() == [1.0, 3.0, 4.0 if keep_regrown else 0.0, 0.0]
    dropped_to = float(original[1]) if mode == "freeze" else 0.0
    assert float(layer.effective_weight().reshape(-1)[1]) == pytest.approx(dropped_to)


def test_only_rigl_keeps_an_entry_dropped_and_grown_again() -> None:
    from drt_peft import DSRConfig, SNFSConfig

    configs = [
        SETConfig(density=0.2),
        RigLConfig(density=0.2, t_end=10),
        SNFSConfig(density=0.2, t_end=10),
        DSRConfig(density=0.2),
    ]
    assert [config.policy.keeps_regrown for config in configs] == [False, True, False, False]


def test_set_drops_the_smallest_positive_and_the_largest_negative_weights() -> None:
    from drt_peft.masks.dynamic import closest_to_zero_by_sign

    weights = torch.tensor([0.5, 0.6, 0.7, 0.8, -0.01, -0.02, -0.03, -0.04])
    # ζ = 0.25 of each side: 0.5 of the four positive and -0.01 of the four negative weights
    assert closest_to_zero_by_sign(weights, 0.25).tolist() == [True] + [False] * 3 + [True] + [False] * 3
    # the smallest |ϑ| alone would take two negative weights
    assert top_k_mask(-weights.abs(), 2).nonzero().flatten().tolist() == [4, 5]
    # each side is rounded on its own; a zero counts with the positive side and goes first
    mixed = torch.tensor([0.3, -0.5, 0.0, 0.2, -0.1, 0.9])
    assert closest_to_zero_by_sign(mixed, 0.5).nonzero().flatten().tolist() == [2, 3, 4]

    model = get_drt_model(tiny_mlp(), SETConfig(density=0.5, drop_fraction=0.25, target_modules=["0"]))
    (_, layer) = next(iter(model.drt_layers()))
    assert layer.num_trainable == 24
    values = torch.linspace(-1.0, 1.0, 24)  # 12 negative, 12 positive: 3 dropped from each side
    with torch.no_grad():
        layer.drt_values.copy_(values[torch.randperm(24, generator=torch.Generator().manual_seed(1))])
    (dropped,) = model.drt_policy.drop(model, 1)
    chosen = sorted(layer.drt_values.detach()[dropped].tolist())
    assert chosen == pytest.approx(values[[9, 10, 11, 12, 13, 14]].tolist())


def test_drop_criterion_change_ranks_what_training_moved() -> None:
    from drt_peft import DSRConfig, SNFSConfig

    model = get_drt_model(tiny_mlp(), RigLConfig(density=0.5, t_end=4, drop_criterion="change", target_modules=["0"]))
    (_, layer) = next(iter(model.drt_layers()))
    base = layer.drt_base_values.clone()
    change = torch.linspace(-0.5, 0.5, layer.num_trainable)[torch.randperm(layer.num_trainable)]
    with torch.no_grad():
        layer.drt_values.copy_(base + change)
    assert torch.allclose(drop_weights(layer, "change"), change, atol=1e-6)
    (dropped,) = model.drt_policy.drop(model, 1)
    k = round(RigLConfig(density=0.5, t_end=4).drop_fraction_at(1) * layer.num_trainable)
    assert torch.equal(dropped, top_k_mask(-(layer.drt_values.detach() - base).abs(), k))
    assert torch.equal(drop_weights(layer), layer.drt_values.detach())
    for cls, extra in ((SETConfig, {}), (RigLConfig, {"t_end": 4}), (SNFSConfig, {"t_end": 4}), (DSRConfig, {})):
        assert cls(density=0.1, **extra).drop_criterion == "magnitude"
        with pytest.raises(ValueError, match="drop_criterion='change' is not supported with mode='prune'"):
            cls(density=0.1, mode="prune", drop_criterion="change", **extra)
    with pytest.raises(ValueError, match=r"drop_criterion='size' is not supported; use one of \['magnitude'"):
        SETConfig(density=0.1, drop_criterion="size")


def test_snfs_drops_half_by_default_as_in_the_paper() -> None:
    from drt_peft import SNFSConfig

    assert SNFSConfig(density=0.1, t_end=10).drop_fraction == 0.5
    assert SETConfig(density=0.1).drop_fraction == RigLConfig(density=0.1, t_end=10).drop_fraction == 0.3


def test_retaining_layer_freezes_dropped_entries_at_their_trained_values() -> None:
    """By hand on a 2 × 3 weight: ψ moves {0, 1, 2} → {0, 4, 5} → {0, 1, 5}; what leaves keeps ϑ, what comes
    back starts from it, unload gives Θ(0) back exactly, and state dicts and adapter tensors carry it all."""
    from drt_peft.layer.retaining import RetainingLayer

    linear = nn.Linear(3, 2)
    original = linear.weight.detach().clone()
    pristine = copy.deepcopy(linear)
    layer = RetainingLayer(linear, torch.tensor([0, 1, 2]))
    optimizer = torch.optim.AdamW([layer.drt_values], lr=0.1)
    layer(torch.randn(4, 3)).pow(2).sum().backward()
    optimizer.step()
    trained = layer.drt_values.detach().clone()
    layer.update_indices(torch.tensor([0, 4, 5]), optimizer)
    expected = original.clone().reshape(-1)
    expected[[1, 2]] = trained[[1, 2]]  # dropped: frozen at their trained values
    expected[[0, 4, 5]] = layer.drt_values.detach()
    assert torch.equal(layer.drt_values.detach()[0], trained[0])
    assert torch.equal(layer.drt_values.detach()[1:], original.reshape(-1)[[4, 5]])  # grown: from Θ(0)
    assert torch.equal(layer.effective_weight().reshape(-1), expected)
    assert layer.drt_retained.tolist() == [1, 2]
    assert layer.adapter_tensors()["retained_values"].tolist() == trained[[1, 2]].tolist()

    with torch.no_grad():
        layer.drt_values.add_(1.0)
    moved = layer.drt_values.detach().clone()
    layer.update_indices(torch.tensor([0, 1, 5]), optimizer)
    assert layer.drt_values.detach().tolist() == [moved[0], trained[1], moved[2]]  # 1 comes back from ϑ
    assert layer.drt_retained.tolist() == [2, 4]
    assert (optimizer.state[layer.drt_values]["exp_avg"][1] == 0).all()
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    trained_weight = layer.effective_weight().clone()
    adapter = {k: v.clone() for k, v in layer.adapter_tensors().items()}

    for load in ("state_dict", "adapter"):
        if load == "state_dict":  # a Trainer resume: the state of the moved ψ into a layer built at the start
            other = RetainingLayer(copy.deepcopy(pristine), torch.tensor([0, 1, 2]))
            other.load_state_dict(state)
        else:  # a saved adapter: a layer built at the stored ψ, then ϑ and the adapter tensors
            other = RetainingLayer(copy.deepcopy(pristine), state["drt_indices"])
            with torch.no_grad():
                other.drt_values.copy_(state["drt_values"])
            other.load_adapter_tensors(adapter)
        assert torch.equal(other.effective_weight(), trained_weight), load
        assert torch.equal(other.unload().weight, original), load

    x = torch.randn(2, 3)
    out = layer(x)
    layer.suspend()
    assert torch.equal(layer.base_layer.weight, original)
    layer.resume()
    assert torch.equal(layer(x), out)
    assert torch.equal(layer.unload().weight, original)
    with pytest.raises(ValueError, match="retained entries must lie outside ψ"):
        RetainingLayer(nn.Linear(3, 2), torch.tensor([0])).retain(torch.tensor([0]), torch.tensor([1.0]))
