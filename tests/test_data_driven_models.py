"""Every data-driven config through get_drt_model on a text transformer and a vision transformer."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import (
    Parity,
    adamw,
    assert_save_load_roundtrip,
    cpu_training_args,
    random_bert_batch,
    random_vit_batch,
    tiny_bert,
    tiny_vit,
    train_steps,
)
from transformers import Trainer

from drt_peft import (
    DRTCallback,
    FISHConfig,
    FORCEConfig,
    FreezeNetConfig,
    GraSPAbsConfig,
    GraSPConfig,
    LubanaDickConfig,
    SNIPConfig,
    SynFlowConfig,
    get_drt_model,
)

CONFIGS = {
    "snip": lambda **kw: SNIPConfig(**kw),
    "grasp": lambda **kw: GraSPConfig(**kw),
    "grasp_abs": lambda **kw: GraSPAbsConfig(**kw),
    "lubana_dick": lambda **kw: LubanaDickConfig(**kw),
    "force": lambda **kw: FORCEConfig(rounds=3, **kw),
    "synflow": lambda **kw: SynFlowConfig(rounds=5, **kw),
    "fish": lambda **kw: FISHConfig(num_samples=6, **kw),
    "freezenet": lambda **kw: FreezeNetConfig(**kw),
}


def _text_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [random_bert_batch(g, length=10) for _ in range(2)]


def _image_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [random_vit_batch(g, size=3) for _ in range(2)]


SETTINGS = [
    ("freeze", "uniform", "unstructured"),
    ("prune", "global", "unstructured"),
    ("prune", "erk", "2:4"),
    ("freeze", "uniform", "rows"),
]
# FreezeNet is defined by freezing; in prune mode it is SNIP, which the snip rows cover.
CASES = [(m, *s) for m in sorted(CONFIGS) for s in SETTINGS if not (m == "freezenet" and s[0] == "prune")]


@pytest.mark.parametrize(("method", "mode", "budget", "structure"), CASES)
def test_text_model_all_modes_budgets_structures(method, mode, budget, structure, tmp_path) -> None:
    density = 0.5 if structure == "2:4" else 0.1
    config = CONFIGS[method](
        density=density, mode=mode, budget=budget, structure=structure, modules_to_save=["classifier"]
    )
    data = _text_batches()
    model = get_drt_model(tiny_bert(), config, calibration_data=data)
    total = sum(layer.base_layer.weight.numel() for _, layer in model.drt_layers())
    d = sum(layer.num_trainable for _, layer in model.drt_layers())
    if structure == "unstructured":
        assert d == round(density * total) or budget == "uniform"
    for name, mask in model.get_masks().items():
        if structure == "2:4":
            assert (mask.reshape(mask.shape[0], -1, 4).sum(-1) <= 2).all(), name
        if structure == "rows":
            assert ((mask.sum(1) == 0) | (mask.sum(1) == mask.shape[1])).all(), name
    train_steps(model, data[:1])
    assert_save_load_roundtrip(model, tiny_bert(), {"input_ids": data[1]["input_ids"]}, tmp_path)


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_vision_transformer(method: str) -> None:
    data = _image_batches()
    model = get_drt_model(
        tiny_vit(), CONFIGS[method](density=0.1, modules_to_save=["classifier"]), calibration_data=data
    )
    loss = model(**data[0]).loss
    loss.backward()
    trained = [layer for _, layer in model.drt_layers() if layer.num_trainable]  # a global budget may skip a layer
    assert trained and all(layer.drt_values.grad is not None for layer in trained)


def test_same_seed_and_data_give_the_same_mask() -> None:
    for method in ("snip", "grasp", "fish"):
        a = get_drt_model(tiny_bert(), CONFIGS[method](density=0.1), calibration_data=_text_batches()).get_masks()
        b = get_drt_model(tiny_bert(), CONFIGS[method](density=0.1), calibration_data=_text_batches()).get_masks()
        assert all(torch.equal(a[k], b[k]) for k in a), method


def test_freezenet_decays_frozen_entries_and_trains_the_rest(tmp_path) -> None:
    base = tiny_bert()
    original = base.bert.encoder.layer[0].intermediate.dense.weight.detach().clone()
    config = FreezeNetConfig(density=0.1, frozen_weight_decay=0.5, modules_to_save=["classifier"])
    data = _text_batches()
    model = get_drt_model(base, config, calibration_data=data)
    optimizer = adamw(model, lr=0.1, weight_decay=0.0)
    model.train()
    for step in range(3):
        model(**data[step % 2]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.update_masks(step, optimizer)
    layer = model.get_base_model().bert.encoder.layer[0].intermediate.dense
    weight, mask = layer.effective_weight(), layer.get_mask()
    assert layer.frozen_scale == pytest.approx(0.95**3)
    assert torch.allclose(weight[~mask], original[~mask] * 0.95**3)
    assert not torch.allclose(weight[mask], original[mask] * 0.95**3)
    model.eval()
    loaded = assert_save_load_roundtrip(model, tiny_bert(), {"input_ids": data[0]["input_ids"]}, tmp_path)
    merged = loaded.merge_and_unload().bert.encoder.layer[0].intermediate.dense.weight
    assert torch.allclose(merged[~mask], original[~mask] * 0.95**3) and torch.equal(merged[mask], weight[mask])
    assert torch.equal(model.unload().bert.encoder.layer[0].intermediate.dense.weight, original)
    with pytest.raises(ValueError, match=r"frozen_weight_decay=0\.1 needs mode='freeze'"):
        FreezeNetConfig(density=0.1, mode="prune", frozen_weight_decay=0.1)


def test_freezenet_decay_through_the_trainer_callback(tmp_path) -> None:

    data = _text_batches()
    model = get_drt_model(tiny_bert(), FreezeNetConfig(density=0.2, frozen_weight_decay=0.1), calibration_data=data)
    args = cpu_training_args(
        tmp_path, per_device_train_batch_size=16, max_steps=4, learning_rate=0.1, lr_scheduler_type="constant"
    )
    Trainer(model=model, args=args, train_dataset=Parity(64), callbacks=[DRTCallback()]).train()
    assert all(layer.frozen_scale == pytest.approx(0.99**4) for _, layer in model.drt_layers())


def test_fish_rescoring_during_training_uses_the_fisher_of_the_current_weights() -> None:
    import copy

    from drt_peft.masks import ScoringContext, select_masks
    from drt_peft.masks.criteria.fisher import fisher_scores, live_fisher_scores
    from drt_peft.targeting import Target

    data = _text_batches()
    config = FISHConfig(density=0.1, num_samples=6, update_frequency=2, modules_to_save=["classifier"])
    model = get_drt_model(tiny_bert(), config, calibration_data=data)
    optimizer = adamw(model, lr=5e-2)
    named = list(model.drt_layers())
    targets = [Target(n, layer.base_layer, layer.op) for n, layer in named]
    d = sum(layer.num_trainable for _, layer in named)
    model.train()
    for step in (1, 2):
        model(**data[step - 1]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 2:  # the Fisher update_masks(2) will use, and the plain criterion on a merged copy
            live = live_fisher_scores(ScoringContext(model, targets, config, data, None, None), [la for _, la in named])
            plain = copy.deepcopy(model).merge_and_unload()
            plain_targets = [Target(n, plain.get_submodule(n), layer.op) for n, layer in named]
            for a, b in zip(
                live, fisher_scores(ScoringContext(plain, plain_targets, config, data, None, None)), strict=True
            ):
                assert torch.allclose(a, b, rtol=1e-5, atol=1e-12)
        logs = model.update_masks(step, optimizer)
        assert (logs == {}) == (step == 1)
    assert logs["drt/moved"] > 0
    masks = model.get_masks()
    assert sum(int(m.sum()) for m in masks.values()) == d
    expected = select_masks(targets, config, live)
    assert all(torch.equal(masks[n], e) for (n, _), e in zip(named, expected, strict=True))


def test_fish_rescoring_keeps_the_trained_values_of_the_entries_it_stops_training(tmp_path) -> None:
    """Sung et al. 2021: the weights FISH stops training keep their current values (freeze mode), every other
    untrained entry stays at Θ(0); the adapter carries them and unload still restores the base exactly."""
    from torch import nn

    data = _text_batches()
    base = tiny_bert()
    original = {n: m.weight.detach().clone() for n, m in base.named_modules() if isinstance(m, nn.Linear)}
    config = FISHConfig(density=0.1, num_samples=6, update_frequency=2, modules_to_save=["classifier"])
    model = get_drt_model(base, config, calibration_data=data)
    optimizer = adamw(model, lr=5e-2)
    layers = dict(model.drt_layers())
    model.train()
    for step in (1, 2):
        model(**data[step - 1]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        before = {n: (layer.drt_indices.clone(), layer.drt_values.detach().clone()) for n, layer in layers.items()}
        model.update_masks(step, optimizer)
    left_in_all = 0
    for name, layer in layers.items():
        indices, values = before[name]
        left = ~torch.isin(indices, layer.drt_indices)
        left_in_all += int(left.sum())
        weight = layer.effective_weight().reshape(-1)
        assert torch.equal(weight[indices[left]], values[left]), name
        untouched = torch.ones_like(weight, dtype=torch.bool)
        untouched[indices] = False
        untouched[layer.drt_indices] = False
        assert torch.equal(weight[untouched], original[name].reshape(-1)[untouched]), name
    assert left_in_all > 0
    model.eval()
    loaded = assert_save_load_roundtrip(model, tiny_bert(), {"input_ids": data[0]["input_ids"]}, tmp_path)
    pairs = list(zip(model.drt_layers(), loaded.drt_layers(), strict=True))
    assert all(torch.equal(a.drt_retained_values, b.drt_retained_values) for (_, a), (_, b) in pairs)
    assert sum(a.drt_retained.numel() for (_, a), _ in pairs) == left_in_all
    unloaded = model.unload()
    assert all(torch.equal(unloaded.get_submodule(name).weight, weight) for name, weight in original.items())


def test_fish_counts_only_the_targeted_weights_in_its_budget() -> None:
    """The paper's 0.5% includes a new classifier; here ``modules_to_save`` train in full beside d."""
    config = FISHConfig(density=0.1, num_samples=6, modules_to_save=["classifier"])
    model = get_drt_model(tiny_bert(), config, calibration_data=_text_batches())
    sizes = sum(layer.base_layer.weight.numel() for _, layer in model.drt_layers())
    assert sum(layer.num_trainable for _, layer in model.drt_layers()) == round(0.1 * sizes)
    assert "classifier" not in {name.rpartition(".")[2] for name, _ in model.drt_layers()}


# -- head warm-up before scoring -----------------------------------------------------------------------------------
def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_head_warm_up_moves_the_head_alone_deterministically_and_gives_it_back() -> None:
    from drt_peft.masks import ScoringContext
    from drt_peft.masks.warmup import head_parameters, head_warmed_up, warm_up_head

    model, data = tiny_bert(), _text_batches()
    config = SNIPConfig(density=0.1, modules_to_save=["classifier"], warmup_steps=4, warmup_lr=0.05)
    scoring = ScoringContext(model, [], config, data, None, lambda scores, density=None: scores)
    before = _state(model)
    with head_warmed_up(scoring):
        during = _state(model)
    moved = {k for k in before if not torch.equal(before[k], during[k])}
    assert moved == {"classifier.weight", "classifier.bias"}  # the head moved, the encoder did not
    assert all(torch.equal(before[k], v) for k, v in _state(model).items())  # and it is given back
    first = warm_up_head(scoring, head_parameters(scoring), 4, 0.05)
    assert first[2] < first[0] and first[3] < first[1]  # the same batches (data is read again), lower loss
    model.load_state_dict(before)
    assert warm_up_head(scoring, head_parameters(scoring), 4, 0.05) == first  # deterministic
    assert all(p.grad is None for p in model.parameters())


def test_scores_after_a_head_warm_up_are_those_of_the_probed_model() -> None:
    data = _text_batches()
    plain = SNIPConfig(density=0.1, modules_to_save=["classifier"])
    probed = tiny_bert()  # by hand: Adam on the head alone, in eval mode, batches 0, 1, 0
    optimizer = torch.optim.Adam(probed.classifier.parameters(), lr=0.05)
    for batch in (data[0], data[1], data[0]):
        optimizer.zero_grad()
        probed(**batch).loss.backward()
        optimizer.step()
    expected = get_drt_model(probed, plain, calibration_data=data).get_masks()
    base = tiny_bert()
    before = _state(base)
    warmed = get_drt_model(base, dataclasses.replace(plain, warmup_steps=3, warmup_lr=0.05), calibration_data=data)
    assert all(torch.equal(warmed.get_masks()[k], m) for k, m in expected.items())
    cold = get_drt_model(tiny_bert(), plain, calibration_data=data).get_masks()
    assert any(not torch.equal(cold[k], m) for k, m in expected.items())
    # the adapter trains the head from the model's own values, and unload gives the model back as it was
    assert torch.equal(warmed.get_base_model().classifier.weight, before["classifier.weight"])
    assert all(torch.equal(before[k], v) for k, v in _state(warmed.unload()).items())


@pytest.mark.parametrize("method", sorted(set(CONFIGS) - {"synflow"}))
def test_every_data_driven_criterion_scores_after_the_warm_up(method: str) -> None:
    config = CONFIGS[method](density=0.1, modules_to_save=["classifier"], warmup_steps=2, warmup_lr=0.05)
    base = tiny_bert()
    before = _state(base)
    model = get_drt_model(base, config, calibration_data=_text_batches())
    assert sum(layer.num_trainable for _, layer in model.drt_layers()) > 0
    assert all(torch.equal(before[k], v) for k, v in _state(model.unload()).items())


def test_head_warm_up_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"warmup_steps=2 trains the modules_to_save before scoring, and "):
        SNIPConfig(density=0.1, warmup_steps=2)
    with pytest.raises(ValueError, match=r"warmup_steps=-1 must be an integer >= 0 \(0: no warm-up\)"):
        SNIPConfig(density=0.1, warmup_steps=-1)
    with pytest.raises(ValueError, match=r"warmup_lr=0 must be a finite number > 0"):
        FISHConfig(density=0.1, warmup_lr=0)
    config = SNIPConfig(density=0.1, modules_to_save=["classifier"], warmup_steps=2)
    with pytest.raises(ValueError, match=r"reads calibration_data twice \(for the head warm-up, then for the scores\)"):
        get_drt_model(tiny_bert(), config, calibration_data=iter(_text_batches()))
