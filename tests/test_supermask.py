"""Supermask / edge-popup: frozen seeded weights, trained scores, top-k masks, straight-through gradients."""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    Parity,
    assert_merge_matches,
    assert_save_load_roundtrip,
    cpu_training_args,
    random_bert_batch,
    random_lm_batch,
    tiny_bert,
    tiny_convnet,
    tiny_gpt2,
    tiny_mlp,
    tiny_vit,
    train_steps,
)
from safetensors import safe_open
from torch import nn
from transformers import Trainer

from drt_peft import DRTCallback, DRTConfig, DRTModel, SupermaskConfig, get_drt_model
from drt_peft.base_weights import PROBE_BYTES_PER_LAYER
from drt_peft.checkpoint.io import WEIGHTS_NAME
from drt_peft.layer.supermask import SupermaskLayer
from drt_peft.topk import top_k_mask


def _train(model: DRTModel, steps: int, lr: float = 0.05, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    train_steps(model, [random_bert_batch(g) for _ in range(steps)], lr=lr)


def _layers(model: DRTModel) -> list[SupermaskLayer]:
    return [layer for _, layer in model.drt_layers()]


@pytest.mark.parametrize("variant", ["top_k", "signed", "bernoulli"])
def test_only_the_scores_train_and_the_base_weights_never_change(variant: str) -> None:
    model = get_drt_model(tiny_bert(), SupermaskConfig(density=0.5, variant=variant))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(layer.scores) for layer in _layers(model)}
    assert not any(layer.drt_values.requires_grad for layer in _layers(model))
    base = {k: p.detach().clone() for k, p in model.named_parameters() if not k.endswith(("scores", "drt_values"))}
    scores = [layer.scores.detach().clone() for layer in _layers(model)]
    masks = model.get_masks()

    _train(model, steps=4)

    after = dict(model.named_parameters())
    assert all(torch.equal(after[k], v) for k, v in base.items())
    assert all(layer.drt_values.grad is None for layer in _layers(model))
    assert all(not torch.equal(s, layer.scores) for s, layer in zip(scores, _layers(model), strict=True))
    assert any(not torch.equal(masks[k], m) for k, m in model.get_masks().items())
    for layer in _layers(model):  # the effective weight is the frozen weight, masked (and signed)
        weight, effective = layer.base_layer.weight, layer.effective_weight()
        kept = layer.get_mask()
        assert torch.equal(effective[~kept], torch.zeros_like(effective[~kept]))
        assert torch.equal(effective[kept].abs(), weight[kept].abs())


@pytest.mark.parametrize(("variant", "ranking"), [("top_k", "abs"), ("top_k", "value"), ("signed", "abs")])
def test_straight_through_gradient_is_weight_gradient_times_frozen_weight(variant: str, ranking: str) -> None:
    """∂L/∂s = ∂L/∂W_eff ⊙ Θ(0); ranking |s| (top_k, as the reference code) chains it through |s|: times sign(s)."""
    config = SupermaskConfig(density=0.5, variant=variant, score_ranking=ranking, target_modules=["0", "2"])
    model = get_drt_model(tiny_mlp(), config)
    first, second = _layers(model)
    x, c = torch.randn(5, 6), torch.randn(5, 3)
    model.train()
    (model(x) * c).sum().backward()

    w1 = first.effective_weight().clone().requires_grad_(True)
    w2 = second.effective_weight().clone().requires_grad_(True)
    out = F.linear(torch.relu(F.linear(x, w1, first.base_layer.bias)), w2, second.base_layer.bias)
    (out * c).sum().backward()
    for layer, w in ((first, w1), (second, w2)):
        expected = w.grad * layer.base_layer.weight
        if variant == "top_k" and ranking == "abs":
            expected = expected * layer.scores.detach().sign()
        assert torch.allclose(layer.scores.grad, expected, atol=1e-6)
        assert w.grad.abs().sum() > 0


def test_top_k_keeps_the_largest_absolute_scores_as_the_reference_code() -> None:
    """Ramanujan et al.'s code ranks |s|: a large negative score keeps its weight; ``"value"`` ranks s itself."""
    masks = {}
    for ranking in ("abs", "value"):
        base = nn.Sequential(nn.Linear(3, 2))
        model = get_drt_model(base, SupermaskConfig(density=0.5, score_ranking=ranking, target_modules=["0"]))
        (layer,) = _layers(model)
        with torch.no_grad():
            layer.scores.copy_(torch.tensor([[-5.0, 1.0, 0.5], [-0.1, 3.0, -2.0]]))
        masks[ranking] = layer.get_mask()
        model.train()
        model(torch.randn(4, 3)).sum().backward()  # the training forward keeps the same mask
        assert torch.equal(layer.effective_weight() != 0, masks[ranking])
    assert masks["abs"].tolist() == [[True, False, False], [False, True, True]]  # -5, 3, -2
    assert masks["value"].tolist() == [[False, True, True], [False, True, False]]  # 3, 1, 0.5
    assert SupermaskConfig(density=0.5).score_ranking == "abs"


@pytest.mark.parametrize("build", [tiny_mlp, tiny_convnet, tiny_gpt2], ids=["linear", "conv2d", "conv1d"])
def test_signed_kaiming_constant_weights_are_plus_or_minus_sigma(build, tmp_path) -> None:
    """weight_init="signed_constant": every seeded weight is ±√2/√fan_in, the sign drawn from the seed."""
    config = SupermaskConfig(density=0.5, weight_init="signed_constant")
    model = get_drt_model(build(), config)
    for name, layer in model.drt_layers():
        weight = layer.base_layer.weight
        sigma = math.sqrt(2.0) / math.sqrt(layer.op.to_matrix(weight).shape[1])
        assert sorted(torch.unique(weight).tolist()) == pytest.approx([-sigma, sigma], rel=1e-6), name
        assert 0.2 < float((weight > 0).float().mean()) < 0.8, name
    again = get_drt_model(build(), config)
    other = get_drt_model(build(), dataclasses.replace(config, seed=1))
    weights = [[layer.base_layer.weight for _, layer in m.drt_layers()] for m in (model, again, other)]
    assert all(torch.equal(a, b) for a, b in zip(weights[0], weights[1], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(weights[0], weights[2], strict=True))
    model.save_pretrained(tmp_path)  # the base is re-drawn on load, the same way, from the stored config
    loaded = DRTModel.from_pretrained(build(), tmp_path)
    for (_, a), (_, b) in zip(model.drt_layers(), loaded.drt_layers(), strict=True):
        assert torch.equal(a.base_layer.weight, b.base_layer.weight) and torch.equal(a.get_mask(), b.get_mask())


def test_as_in_paper_is_edge_popup_on_signed_constant_weights() -> None:
    paper = SupermaskConfig.as_in_paper(density=0.5, modules_to_save=["classifier"])
    explicit = SupermaskConfig(density=0.5, weight_init="signed_constant", modules_to_save=["classifier"])
    assert paper == explicit and (paper.variant, paper.score_ranking, paper.base_init) == ("top_k", "abs", "seeded")


def test_bernoulli_gradient_passes_through_the_sample_to_sigmoid_of_the_scores() -> None:
    model = get_drt_model(tiny_mlp(), SupermaskConfig(density=0.5, variant="bernoulli", target_modules=["0"]))
    (layer,) = _layers(model)
    x = torch.randn(5, 6)
    model.train()
    model.get_base_model()[0](x).sum().backward()
    # y = x W_effᵀ + b, L = Σ y: ∂L/∂W_eff = 1ᵀ x whatever mask was drawn.
    grad_weight = torch.ones(5, 8).t() @ x
    sigmoid = torch.sigmoid(layer.scores.detach())
    expected = grad_weight * layer.base_layer.weight * sigmoid * (1 - sigmoid)
    assert torch.allclose(layer.scores.grad, expected, atol=1e-6)


@pytest.mark.parametrize("variant", ["top_k", "signed"])
@pytest.mark.parametrize("budget", ["uniform", "erk"])
def test_exactly_k_weights_kept_per_layer(variant: str, budget: str) -> None:
    model = get_drt_model(tiny_bert(), SupermaskConfig(density=0.3, variant=variant, budget=budget))
    counts = {name: layer.num_trainable for name, layer in model.drt_layers()}
    if budget == "uniform":
        assert all(counts[name] == round(0.3 * layer.scores.numel()) for name, layer in model.drt_layers())
    else:
        total = sum(layer.scores.numel() for layer in _layers(model))
        assert sum(counts.values()) == round(0.3 * total)
    _train(model, steps=3)
    for name, layer in model.drt_layers():
        mask = layer.get_mask()
        assert int(mask.sum()) == counts[name] == layer.num_trainable == layer.k
        key = layer.scores.abs()  # both rank |s| ("top_k" by default, as the reference code)
        assert key[mask].min() >= key[~mask].max()  # the mask is the top-k of the scores


@pytest.mark.parametrize("variant", ["top_k", "signed", "bernoulli"])
def test_save_load_gives_identical_outputs_and_stores_no_weight_values(variant: str, tmp_path) -> None:
    model = get_drt_model(tiny_bert(), SupermaskConfig(density=0.5, variant=variant))
    _train(model, steps=3)
    inputs = {"input_ids": random_bert_batch(torch.Generator().manual_seed(5))["input_ids"]}
    loaded = assert_save_load_roundtrip(model, tiny_bert(), inputs, tmp_path)

    file = os.path.join(tmp_path, WEIGHTS_NAME)
    with safe_open(file, framework="pt") as handle:
        keys = set(handle.keys())
    assert "drt_values" not in keys and not any(k.startswith("modules_to_save") for k in keys)
    total = sum(layer.scores.numel() for layer in _layers(model))
    # the mask is at most a bitmap of D bits (+ 1 bit per kept weight for signs), a header and the base probe
    signs = total // 8 if variant == "signed" else 0
    assert os.path.getsize(file) < total // 8 + signs + 3000 + PROBE_BYTES_PER_LAYER * len(_layers(model))

    assert_merge_matches(loaded, inputs)
    layers = _layers(model)
    weights = [layer.base_layer.weight.clone() for layer in layers]
    plain = model.unload()  # the frozen weights Θ(0), unmasked
    assert all(torch.equal(layer.base_layer.weight, w) for layer, w in zip(layers, weights, strict=True))
    assert not any(isinstance(m, SupermaskLayer) for m in plain.modules())


def test_signed_variant_inverts_weights_and_the_signs_survive_save_load(tmp_path) -> None:
    model = get_drt_model(tiny_bert(), SupermaskConfig(density=0.5, variant="signed"))
    _train(model, steps=2)
    inputs = {"input_ids": random_bert_batch(torch.Generator().manual_seed(6))["input_ids"]}
    loaded = assert_save_load_roundtrip(model, tiny_bert(), inputs, tmp_path)
    inverted = 0
    for trained, restored in zip(_layers(model), _layers(loaded), strict=True):
        kept = trained.get_mask()
        ratio = trained.effective_weight()[kept] / trained.base_layer.weight[kept]
        assert set(ratio.unique().tolist()) <= {-1.0, 1.0}
        inverted += int((ratio < 0).sum())
        assert torch.equal(restored.effective_weight(), trained.effective_weight())
    assert inverted > 0
    with safe_open(os.path.join(tmp_path, WEIGHTS_NAME), framework="pt") as handle:
        packed = handle.get_tensor("drt_layer.0.signs")
    assert packed.dtype == torch.uint8 and packed.numel() == (_layers(model)[0].num_trainable + 7) // 8


def test_bernoulli_draws_are_seeded_and_evaluation_uses_sigmoid_above_half() -> None:
    def build(seed: int) -> DRTModel:
        return get_drt_model(tiny_mlp(), SupermaskConfig(density=0.5, variant="bernoulli", seed=seed))

    a, b, other = build(3), build(3), build(4)
    x = torch.randn(7, 6)
    for model in (a, b, other):
        model.train()
    first_a, first_b = a(x), b(x)
    assert torch.equal(first_a, first_b)
    assert not torch.equal(first_a, other(x))
    second_a = a(x)
    assert torch.equal(second_a, b(x))
    assert not torch.equal(second_a, first_a)  # a fresh mask per training forward

    for model in (a, b):
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        for _ in range(3):
            model(x).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
    assert all(torch.equal(la.scores, lb.scores) for la, lb in zip(_layers(a), _layers(b), strict=True))
    total = 0
    for layer in _layers(a):
        assert torch.equal(layer.get_mask(), torch.sigmoid(layer.scores) > 0.5)
        total += layer.num_trainable
    assert a.drt_statistics()["drt/density"] == total / sum(layer.scores.numel() for layer in _layers(a))
    assert_merge_matches(a, x)


def test_state_dict_round_trip_restores_scores_and_draws() -> None:
    config = SupermaskConfig(density=0.3, variant="bernoulli", seed=1)
    trained = get_drt_model(tiny_bert(), config)
    _train(trained, steps=3, lr=0.3)
    fresh = get_drt_model(tiny_bert(), config)
    assert any(a.num_trainable != b.num_trainable for a, b in zip(_layers(trained), _layers(fresh), strict=True))
    fresh.load_state_dict(trained.state_dict())
    inputs = {"input_ids": random_bert_batch(torch.Generator().manual_seed(7))["input_ids"]}
    fresh.eval()
    assert torch.equal(fresh(**inputs).logits, trained(**inputs).logits)
    for model in (trained, fresh):
        model.train()
    torch.manual_seed(0)
    next_trained = trained(**inputs).logits
    torch.manual_seed(0)
    assert torch.equal(fresh(**inputs).logits, next_trained)


@pytest.mark.parametrize("variant", ["top_k", "bernoulli"])
def test_trainer_resume_continues_the_scores_and_masks(variant: str, tmp_path) -> None:
    def trainer(output_dir: str) -> Trainer:
        model = get_drt_model(tiny_bert(), SupermaskConfig(density=0.5, variant=variant))
        args = cpu_training_args(
            output_dir, per_device_train_batch_size=8, max_steps=6, learning_rate=0.1,
            save_strategy="steps", save_steps=3,
        )  # fmt: skip
        return Trainer(model=model, args=args, train_dataset=Parity(48), callbacks=[DRTCallback()])

    straight = trainer(str(tmp_path / "a"))
    straight.train()
    resumed = trainer(str(tmp_path / "b"))
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    expected, got = straight.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    masks = straight.model.get_masks()
    assert all(torch.equal(m, masks[k]) for k, m in resumed.model.get_masks().items())


def test_the_mask_follows_the_scores_through_fused_steps_and_in_place_edits() -> None:
    model = get_drt_model(tiny_bert(), SupermaskConfig(density=0.5))
    layer = _layers(model)[0]
    before = layer.get_mask()
    optimizer = torch.optim.AdamW([layer.scores], lr=0.5, fused=True)  # updates without a version bump
    model.train()
    model(**random_bert_batch(torch.Generator().manual_seed(0))).loss.backward()
    optimizer.step()
    expected = torch.nonzero(top_k_mask(layer.scores.detach().flatten().abs(), layer.k)).flatten()
    assert torch.equal(layer.get_mask().flatten().nonzero().flatten(), expected)
    assert not torch.equal(layer.get_mask(), before)
    model.requires_grad_(False)
    model.eval()
    mask = layer.get_mask()
    with torch.no_grad():
        layer.scores.reciprocal_()  # k = D/2: the top-k of |1/s| is the complement
    assert torch.equal(layer.get_mask(), ~mask)


def test_adapter_tensors_are_checked_on_load() -> None:
    signed = _layers(get_drt_model(tiny_bert(), SupermaskConfig(density=0.5, variant="signed")))[0]
    with pytest.raises(ValueError, match="packed signs"):
        signed.load_adapter_tensors({})
    plain = _layers(get_drt_model(tiny_bert(), SupermaskConfig(density=0.5)))[0]
    with pytest.raises(ValueError, match="no extra adapter tensors"):
        plain.load_adapter_tensors(signed.adapter_tensors())


def test_same_seed_same_scores_and_masks() -> None:
    a = get_drt_model(tiny_bert(), SupermaskConfig(density=0.5))
    b = get_drt_model(tiny_bert(), SupermaskConfig(density=0.5))
    c = get_drt_model(tiny_bert(), SupermaskConfig(density=0.5, seed=1))
    assert all(torch.equal(la.scores, lb.scores) for la, lb in zip(_layers(a), _layers(b), strict=True))
    assert all(torch.equal(m, b.get_masks()[k]) for k, m in a.get_masks().items())
    assert any(not torch.equal(m, c.get_masks()[k]) for k, m in a.get_masks().items())


@pytest.mark.parametrize("build", [tiny_vit, tiny_gpt2], ids=["vit", "gpt2"])
def test_vision_transformer_and_conv1d(build) -> None:
    model = get_drt_model(build(), SupermaskConfig(density=0.5, variant="signed"))
    model.train()
    g = torch.Generator().manual_seed(4)
    if build is tiny_vit:
        batch = {"pixel_values": torch.randn(3, 1, 16, 16, generator=g), "labels": torch.tensor([0, 2, 1])}
    else:
        batch = random_lm_batch(g, size=2, length=10)
    weights = [layer.base_layer.weight.clone() for layer in _layers(model)]
    model(**batch).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert all(layer.scores.grad is not None and layer.scores.grad.abs().sum() > 0 for layer in _layers(model))
    assert all(torch.equal(layer.base_layer.weight, w) for layer, w in zip(_layers(model), weights, strict=True))
    model.eval()
    assert all(layer.num_trainable == layer.k for layer in _layers(model))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"variant": "sampled"}, "variant='sampled'"),
        ({"mode": "freeze"}, "mode='freeze'"),
        ({"budget": "global"}, "budget='global'"),
        ({"structure": "2:4"}, "structure='2:4'"),
        ({"density": 1.5}, "density=1.5"),
        ({"score_ranking": "sigmoid"}, "score_ranking='sigmoid' is not supported; use one of"),
        ({"variant": "signed", "score_ranking": "value"}, "score_ranking='value' applies to variant='top_k' only"),
        ({"weight_init": "xavier"}, "weight_init='xavier' is not supported; use one of"),
        (
            {"weight_init": "signed_constant", "base_init": "pretrained"},
            "weight_init='signed_constant' draws Θ\\(0\\) from the seed; use it with base_init='seeded'",
        ),
    ],
)
def test_bad_config_values_raise_clear_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        SupermaskConfig(**{"density": 0.5, **kwargs})
    assert "use" in str(err.value) or "range" in str(err.value)


def test_config_round_trips_through_json(tmp_path) -> None:
    config = SupermaskConfig(density=0.5, variant="signed")
    assert (config.mode, config.base_init, config.values_from_base) == ("prune", "seeded", True)
    config.save_pretrained(tmp_path)
    assert DRTConfig.from_pretrained(tmp_path) == config
