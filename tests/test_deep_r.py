"""DEEP-R (Bellec et al. 2018): fixed signs, the prior and noise step scaled by the learning rate, drops at sign
crossings, as many random regrowths, exact d, determinism; resume is in test_resume.py and test_conformance.py."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import adamw, random_bert_batch, tiny_bert, tiny_mlp, train_updating_masks
from torch import nn

from drt_peft import DeepRConfig, DRTModel, get_drt_model
from drt_peft.methods.deep_r import _bits_at, _pack_bits


def _dormant_values(layer) -> torch.Tensor:
    """c at ψ: what a dormant entry holds, Θ(0) in freeze mode, 0 in prune mode."""
    return layer.drt_base_values if layer.mode == "freeze" else torch.zeros_like(layer.drt_values.detach())


def test_config_defaults_and_bad_inputs() -> None:
    config = DeepRConfig(density=0.1)
    assert (config.update_frequency, config.temperature, config.l1, config.budget) == (1, 2.5e-11, 1e-5, "erk")
    assert not hasattr(config, "drop_fraction") and not hasattr(config, "drop_criterion")
    assert DeepRConfig.from_dict(config.to_dict()) == config
    for name, value in [("temperature", -1.0), ("temperature", math.inf), ("l1", math.nan), ("l1", True), ("l1", "0")]:
        with pytest.raises(ValueError, match=rf"^{name}={value!r} is not allowed; use a finite number >= 0"):
            DeepRConfig(density=0.1, **{name: value})
    with pytest.raises(ValueError, match="update_frequency=0 must be a positive integer"):
        DeepRConfig(density=0.1, update_frequency=0)
    with pytest.raises(ValueError, match="structure='rows' is not supported by 'deep_r'"):
        DeepRConfig(density=0.1, structure="rows")
    with pytest.raises(NotImplementedError, match="DeepRConfig records no paper setting"):
        DeepRConfig.as_in_paper(density=0.1)


def test_bit_packing_round_trips() -> None:
    bits = torch.rand(21, generator=torch.Generator().manual_seed(0)) < 0.5
    packed = _pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.numel() == 3
    assert torch.equal(_bits_at(packed, torch.arange(21)).bool(), bits)


@pytest.mark.parametrize("mode", ["freeze", "prune"])
def test_signs_are_fixed_per_position_and_every_entry_starts_active(mode: str) -> None:
    """Prune mode: s = sign(Θ(0)) at every position, so θ starts at |Θ(0)|; freeze mode: s drawn from the seed at
    every position, θ starts at 0."""
    model = get_drt_model(tiny_bert(), DeepRConfig(density=0.2, mode=mode))
    other_seed = get_drt_model(tiny_bert(), DeepRConfig(density=0.2, mode=mode, seed=1))
    for i, (_, layer) in enumerate(model.drt_layers()):
        weight = layer.base_layer.weight.detach()
        signs = 1 - 2 * _bits_at(getattr(model.drt_policy, f"signs_{i}"), torch.arange(weight.numel())).float()
        theta = model.drt_policy.thetas(i, layer)
        if mode == "prune":
            assert torch.equal(signs, torch.where(weight.reshape(-1) < 0, -1.0, 1.0))
            assert torch.equal(theta, layer.drt_values.detach().abs())
        else:
            assert abs(float(signs.mean())) < 0.1
            assert torch.equal(theta, torch.zeros_like(theta))
        assert torch.equal(model.drt_policy.signs(i, layer), signs[layer.drt_indices])
    differ = [
        not torch.equal(getattr(model.drt_policy, f"signs_{i}"), getattr(other_seed.drt_policy, f"signs_{i}"))
        for i in range(len(list(model.drt_layers())))
    ]
    assert all(differ) == (mode == "freeze")


@pytest.mark.parametrize("mode", ["freeze", "prune"])
def test_an_update_shrinks_theta_drops_the_crossings_and_regrows_as_many(mode: str) -> None:
    """By hand, with SGD at η = 0.1 and α = 0.5, no noise: every θ shrinks by η·α = 0.05 in the update; the entries
    set to θ = 0.03 cross zero and are dropped, those at θ = 0.2 stay at 0.15 with their momentum, and as many
    dormant positions grow at θ = 0 with none."""
    config = DeepRConfig(density=0.5, mode=mode, l1=0.5, temperature=0.0, target_modules=["0"])
    model = get_drt_model(tiny_mlp(), config)
    (_, layer), policy = next(iter(model.drt_layers())), model.drt_policy
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    d = layer.num_trainable
    start = torch.where(torch.arange(d) % 3 == 0, 0.03, 0.2)
    signs, dormant = policy.signs(0, layer), _dormant_values(layer).clone()
    with torch.no_grad():
        layer.drt_values.copy_(dormant + signs * start)
    optimizer.state[layer.drt_values]["momentum_buffer"] = torch.ones(d)
    before = layer.drt_indices.clone()
    crossing = start < 0.05

    logs = model.update_masks(1, optimizer)

    assert logs == {"drt/moved": float(crossing.sum())}
    assert layer.num_trainable == d
    kept = before[~crossing]
    assert not set(before[crossing].tolist()) & set(kept.tolist())
    now = layer.drt_indices
    is_kept = torch.isin(now, kept)
    assert torch.equal(now[is_kept], kept) and int((~is_kept).sum()) == int(crossing.sum())
    values = layer.drt_values.detach()
    torch.testing.assert_close(values[is_kept], (dormant + signs * 0.15)[~crossing])
    grown_start = torch.zeros(int((~is_kept).sum())) if mode == "prune" else layer.drt_base_values[~is_kept]
    assert torch.equal(values[~is_kept], grown_start)  # θ = 0
    assert torch.equal(policy.thetas(0, layer)[~is_kept], torch.zeros_like(grown_start))
    momentum = optimizer.state[layer.drt_values]["momentum_buffer"]
    assert (momentum[is_kept] == 1).all() and (momentum[~is_kept] == 0).all()


def test_noise_is_gaussian_with_the_learning_rate_of_each_parameter_group() -> None:
    """With α = 0 and no update due, a step adds s·√(2ηT)·ν to ϑ, ν ~ N(0, 1) drawn anew at each step from the
    seed, η the learning rate of the group holding the layer's ϑ."""
    temperature, rates = 1e-4, [0.1, 0.4]
    config = DeepRConfig(density=0.5, mode="prune", temperature=temperature, l1=0.0, update_frequency=1000)

    def draws(steps: int) -> list[list[torch.Tensor]]:
        """ν of each layer at steps 1..``steps`` of a fresh model."""
        model = get_drt_model(tiny_mlp((64, 64, 64)), config)
        layers = [layer for _, layer in model.drt_layers()]
        optimizer = torch.optim.SGD(
            [{"params": [layer.drt_values], "lr": lr} for layer, lr in zip(layers, rates, strict=True)]
        )
        out = []
        for step in range(1, steps + 1):
            before = [layer.drt_values.detach().clone() for layer in layers]
            model.update_masks(step, optimizer)
            signs = [model.drt_policy.signs(i, layer) for i, layer in enumerate(layers)]
            out.append(
                [
                    (layer.drt_values.detach() - old) * s / math.sqrt(2 * lr * temperature)
                    for layer, old, s, lr in zip(layers, before, signs, rates, strict=True)
                ]
            )
        return out

    (first, second), (again,) = draws(2), draws(1)
    for nu, nu_next, nu_again in zip(first, second, again, strict=True):
        assert nu.numel() > 1000
        assert abs(float(nu.mean())) < 0.1 and abs(float(nu.std()) - 1) < 0.1  # scaled by the own group's η
        assert torch.equal(nu, nu_again) and not torch.allclose(nu, nu_next)


def test_without_noise_prior_or_crossings_the_mask_and_values_stay() -> None:
    """T = 0 and α = 0: the update only judges signs, and while no θ crosses zero it moves nothing, neither ψ nor
    what the optimizer made of ϑ."""
    model = get_drt_model(tiny_bert(), DeepRConfig(density=0.2, mode="prune", temperature=0.0, l1=0.0))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    layers = list(model.drt_layers())
    start = {name: layer.drt_indices.clone() for name, layer in layers}
    g = torch.Generator().manual_seed(2)
    model.train()
    for step in range(1, 6):
        model(**random_bert_batch(g)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert all((model.drt_policy.thetas(i, layer) > 0).all() for i, (_, layer) in enumerate(layers))
        trained = {name: layer.drt_values.detach().clone() for name, layer in layers}
        assert model.update_masks(step, optimizer) == {"drt/moved": 0.0}
        for name, layer in layers:
            assert torch.equal(layer.drt_indices, start[name]) and torch.equal(layer.drt_values.detach(), trained[name])


def _train(config: DeepRConfig, steps: int = 6) -> DRTModel:
    model = get_drt_model(tiny_bert(), config)
    g = torch.Generator().manual_seed(4)
    train_updating_masks(model, [random_bert_batch(g) for _ in range(steps)])
    return model


@pytest.mark.parametrize("mode", ["freeze", "prune"])
def test_training_keeps_d_exact_every_theta_active_and_changes_only_trained_entries(mode: str) -> None:
    config = DeepRConfig(density=0.1, mode=mode, temperature=1e-6, l1=1e-2, update_frequency=2)
    base = tiny_bert()
    originals = {n: m.weight.detach().clone() for n, m in base.named_modules() if isinstance(m, nn.Linear)}
    model = get_drt_model(base, config)
    layers = dict(model.drt_layers())
    sizes = {name: layer.num_trainable for name, layer in layers.items()}
    optimizer = adamw(model, lr=1e-2)
    g = torch.Generator().manual_seed(3)
    model.train()
    moved = 0
    for step in range(1, 9):
        model(**random_bert_batch(g)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        before = {name: layer.drt_indices.clone() for name, layer in layers.items()}
        moved += model.update_masks(step, optimizer).get("drt/moved", 0)
        for i, (name, layer) in enumerate(layers.items()):
            assert layer.num_trainable == sizes[name], f"step {step}: {name}"
            if step % 2 == 0:  # an update step: no entry with θ < 0 is left
                assert (model.drt_policy.thetas(i, layer) >= 0).all(), f"step {step}: {name}"
            fresh = ~torch.isin(layer.drt_indices, before[name])
            state = optimizer.state[layer.drt_values]
            assert (state["exp_avg"][fresh] == 0).all() and (state["exp_avg_sq"][fresh] == 0).all()
    assert moved > 0
    for name, layer in layers.items():
        on = layer.get_mask()
        outside = originals[name][~on] if mode == "freeze" else torch.zeros_like(originals[name][~on])
        assert torch.equal(layer.effective_weight()[~on], outside), name
        assert torch.equal(layer.effective_weight().reshape(-1)[layer.drt_indices], layer.drt_values.detach())
    unloaded = model.unload()
    for name, weight in originals.items():
        assert torch.equal(unloaded.get_submodule(name).weight, weight), name


def test_the_same_seed_gives_the_same_run_and_another_seed_another() -> None:
    config = DeepRConfig(density=0.2, temperature=1e-6, l1=1e-3)
    a, b, c = _train(config), _train(config), _train(DeepRConfig(density=0.2, temperature=1e-6, l1=1e-3, seed=7))
    for (name, x), (_, y) in zip(a.drt_layers(), b.drt_layers(), strict=True):
        assert torch.equal(x.drt_indices, y.drt_indices) and torch.equal(x.drt_values, y.drt_values), name
    assert torch.equal(a.drt_policy.signs_0, b.drt_policy.signs_0)
    pairs = zip(a.drt_layers(), c.drt_layers(), strict=True)
    assert any(not torch.equal(x.drt_indices, z.drt_indices) for (_, x), (_, z) in pairs)


@pytest.mark.parametrize("mode", ["freeze", "prune"])
def test_a_saved_adapter_loads_with_the_same_signs(mode: str, tmp_path) -> None:
    model = _train(DeepRConfig(density=0.2, mode=mode, temperature=1e-6), steps=3)
    model.save_pretrained(tmp_path)
    loaded = DRTModel.from_pretrained(tiny_bert(), tmp_path, is_trainable=True)
    for i, ((name, layer), (_, twin)) in enumerate(zip(model.drt_layers(), loaded.drt_layers(), strict=True)):
        assert torch.equal(getattr(model.drt_policy, f"signs_{i}"), getattr(loaded.drt_policy, f"signs_{i}")), name
        assert (loaded.drt_policy.thetas(i, twin) >= 0).all() and torch.equal(twin.drt_indices, layer.drt_indices)
