"""SpIEL-AG (Ansell et al. 2024): gradients summed over the window before each update, by hand on a tiny MLP;
drops by the size of the change, the linear decay, exact d, no dense gradient outside the windows, bad inputs.
Resume inside a window is in test_resume.py, identical masks on two processes in test_distributed.py."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import adamw, tiny_mlp
from torch import nn

from drt_peft import DRTModel, SpIELConfig, get_drt_model
from drt_peft.masks.selection import indices_of
from drt_peft.topk import top_k_mask


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)


def _dense_gradient(model: DRTModel, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """∂L/∂Θ of the first Linear, by autograd on a merged copy of the model."""
    merged = copy.deepcopy(model).merge_and_unload()
    merged[0].weight.requires_grad_(True)
    loss = nn.functional.mse_loss(merged(x), y)
    return torch.autograd.grad(loss, merged[0].weight)[0]


def _spiel(**fields: object) -> DRTModel:
    small = {"density": 0.25, "update_frequency": 4, "accumulation_steps": 2, "t_end": 8, "target_modules": ["0"]}
    return get_drt_model(tiny_mlp(), SpIELConfig(**{**small, **fields}))


def test_update_grows_where_the_window_sum_is_largest_and_drops_what_moved_least() -> None:
    """Steps 3 and 4 form the window of the update at step 4: it drops the ζ_4 = 0.2·(1 − 4/8) fraction of ψ with
    the smallest |ϑ − Θ(0)| and grows where |g_3 + g_4| is largest; steps 1 and 2 form no dense gradient."""
    model = _spiel()
    (_, layer) = next(iter(model.drt_layers()))
    optimizer = adamw(model, lr=0.05)
    base = layer.base_layer.weight.detach().clone().reshape(-1)  # Θ(0): the frozen weight
    window_sum = torch.zeros_like(base)
    for step in range(1, 5):
        x, y = _batch(step)
        if step >= 3:
            window_sum += _dense_gradient(model, x, y).reshape(-1)
        nn.functional.mse_loss(model(x), y).backward()
        assert (layer.dense_grad is not None) == (step >= 3)
        optimizer.step()
        optimizer.zero_grad()
        if step == 4:
            before = layer.drt_indices.clone()
            change = (layer.drt_values.detach() - base[before]).abs()
            accumulated = model.drt_policy.accumulated_0 + layer.dense_grad  # step 3's, and step 4's still to add
            assert torch.allclose(accumulated.reshape(-1), window_sum, atol=1e-6)
            values = dict(zip(before.tolist(), layer.drt_values.detach().tolist(), strict=True))
        logs = model.update_masks(step, optimizer)
        assert not hasattr(model.drt_policy, "accumulated_0") or step == 3
    k = round(0.2 * (1 - 4 / 8) * before.numel())
    assert k > 0 and logs["drt/moved"] == k and logs["drt/drop_fraction"] == pytest.approx(0.1)
    dropped = top_k_mask(-change, k)
    scores = window_sum.abs().double()
    scores[before[~dropped]] = float("-inf")
    grown = indices_of(top_k_mask(scores, k))
    expected = torch.sort(torch.cat([before[~dropped], grown])).values
    assert torch.equal(layer.drt_indices, expected)
    assert layer.num_trainable == before.numel()  # d exact
    after = dict(zip(layer.drt_indices.tolist(), layer.drt_values.detach().tolist(), strict=True))
    for position in layer.drt_indices.tolist():  # kept (or dropped and regrown) keep ϑ; new ones start at Θ(0)
        assert after[position] == pytest.approx(values.get(position, float(base[position])))
    assert layer.dense_grad is None and not layer.capture_dense_grad  # step 5 is outside the next window


def test_window_spans_the_steps_before_each_update_until_t_end() -> None:
    policy = _spiel(update_frequency=3, accumulation_steps=2, t_end=7).drt_policy
    assert [s for s in range(1, 12) if policy.in_window(s)] == [2, 3, 5, 6]  # no update after t_end = 7
    whole = _spiel(update_frequency=2, accumulation_steps=2, t_end=6).drt_policy
    assert [s for s in range(0, 9) if whole.in_window(s)] == [1, 2, 3, 4]  # ζ_6 = 0: the update at t_end moves nothing


def test_config_defaults_schedule_and_bad_inputs() -> None:
    config = SpIELConfig(density=0.01, t_end=1000)
    assert (config.budget, config.mode, config.drop_criterion, config.drop_fraction) == (
        "uniform", "freeze", "change", 0.2,
    )  # fmt: skip
    assert (config.update_frequency, config.accumulation_steps) == (100, 5)
    assert [config.drop_fraction_at(t) for t in (0, 250, 1000)] == pytest.approx([0.2, 0.15, 0.0])
    assert SpIELConfig.from_dict(config.to_dict()) == config
    assert SpIELConfig.as_in_paper(density=0.01, t_end=1000) == config
    with pytest.raises(ValueError, match=r"accumulation_steps=6 exceeds update_frequency=5: .* <= 5"):
        SpIELConfig(density=0.01, t_end=10, update_frequency=5, accumulation_steps=6)
    with pytest.raises(ValueError, match="accumulation_steps=0 must be a positive integer"):
        SpIELConfig(density=0.01, t_end=10, accumulation_steps=0)
    with pytest.raises(ValueError, match=r"t_end=None: SpIELConfig's drop fraction decays to 0 at t_end \(α_t = α"):
        SpIELConfig(density=0.01)
    with pytest.raises(ValueError, match="drop_criterion='change' is not supported with mode='prune'"):
        SpIELConfig(density=0.01, t_end=10, mode="prune")
    SpIELConfig(density=0.01, t_end=10, mode="prune", drop_criterion="magnitude")


def test_prune_mode_trains_with_exact_d_and_the_same_seed_gives_the_same_masks() -> None:
    def run() -> DRTModel:
        model = _spiel(mode="prune", drop_criterion="magnitude")
        optimizer = adamw(model, lr=0.05)
        for step in range(1, 9):
            x, y = _batch(step)
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            model.update_masks(step, optimizer)
        return model

    first, second = run(), run()
    (_, a), (_, b) = next(iter(first.drt_layers())), next(iter(second.drt_layers()))
    (_, start) = next(iter(_spiel(mode="prune", drop_criterion="magnitude").drt_layers()))
    assert a.num_trainable == start.num_trainable == round(0.25 * 48)
    assert torch.equal(a.drt_indices, b.drt_indices) and not torch.equal(a.drt_indices, start.drt_indices)


def test_a_non_finite_step_adds_nothing_and_a_missing_layer_adds_zero() -> None:
    model = _spiel(target_modules=["0", "2"])
    layers = [layer for _, layer in model.drt_layers()]
    optimizer = adamw(model, lr=0.05)
    for step in (1, 2):
        x, y = _batch(step)
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        model.update_masks(step, optimizer)
    x, y = _batch(3)
    nn.functional.mse_loss(model(x), y).backward()
    layers[1].dense_grad[0, 0] = float("inf")  # an overflowing step: left out of the sums
    optimizer.step()
    with pytest.warns(UserWarning, match="step 3: non-finite gradients; SpIEL leaves them out"):
        model.update_masks(3, optimizer)
    assert not hasattr(model.drt_policy, "accumulated_0") and layers[0].dense_grad is None
    x, y = _batch(4)
    nn.functional.mse_loss(model(x), y).backward()
    expected = layers[0].dense_grad.clone()
    layers[1].dense_grad = None  # as if the layer took no part in the forward
    model.drt_policy.observe(model, 4)
    assert torch.equal(model.drt_policy.accumulated_0, expected)
    assert not hasattr(model.drt_policy, "accumulated_1")
    assert torch.equal(model.drt_policy.grow_scores(1, "2", layers[1], 4), torch.zeros(layers[1].weight_shape))


def test_attach_keeps_the_sums_only_inside_a_window() -> None:
    model = _spiel()
    (_, layer) = next(iter(model.drt_layers()))
    model.drt_policy.register_buffer("accumulated_0", torch.ones(layer.weight_shape))
    model.drt_policy.on_attach(model, 3)  # resuming after step 3 of the window 3, 4
    assert torch.equal(model.drt_policy.accumulated_0, torch.ones(layer.weight_shape)) and layer.capture_dense_grad
    model.drt_policy.on_attach(model, 4)  # after the update: the sums are spent
    assert not hasattr(model.drt_policy, "accumulated_0") and not layer.capture_dense_grad
