"""Fixed classifier: y = α·W·x with a seeded random orthogonal W and one trained temperature α."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import (
    assert_merge_matches,
    assert_save_load_roundtrip,
    random_bert_batch,
    random_vit_batch,
    tiny_bert,
    tiny_gpt2,
    tiny_vit,
    train_steps,
)
from safetensors import safe_open
from torch import nn
from transformers.pytorch_utils import Conv1D

from drt_peft import DRTConfig, DRTModel, FixedClassifierConfig, get_drt_model
from drt_peft.layer.fixed_classifier import FixedClassifierLayer, random_orthogonal
from drt_peft.seeding import generator


def _head_weight(model: DRTModel) -> torch.Tensor:
    return model.get_base_model().classifier.fixed_weight


@pytest.mark.parametrize(("rows", "cols"), [(2, 32), (3, 3), (40, 8)])
def test_fixed_weight_is_orthogonal(rows: int, cols: int) -> None:
    w = random_orthogonal(rows, cols, generator(0, "fixed_classifier", "head"))
    assert w.shape == (rows, cols)
    if rows <= cols:  # orthonormal rows
        assert torch.allclose(w @ w.t(), torch.eye(rows, dtype=torch.float64), atol=1e-12)
    if rows >= cols:  # orthonormal columns
        assert torch.allclose(w.t() @ w, torch.eye(cols, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("module", [nn.Linear(32, 2), Conv1D(2, 32), nn.Linear(4, 10)])
def test_layer_weight_is_orthogonal_in_the_out_by_in_view(module: nn.Module) -> None:
    layer = FixedClassifierLayer(module)
    layer.draw_fixed_weight(0, "head")
    w = layer.op.to_matrix(layer.fixed_weight)
    out, inp = w.shape
    gram = w @ w.t() if out <= inp else w.t() @ w
    assert torch.allclose(gram, torch.eye(min(out, inp)), atol=1e-6)


def test_same_seed_same_weight_different_seed_different() -> None:
    a = get_drt_model(tiny_bert(), FixedClassifierConfig(seed=3))
    b = get_drt_model(tiny_bert(seed=1), FixedClassifierConfig(seed=3))
    c = get_drt_model(tiny_bert(), FixedClassifierConfig(seed=4))
    assert torch.equal(_head_weight(a), _head_weight(b))  # a function of the seed, not of the base weights
    assert not torch.allclose(_head_weight(a), _head_weight(c))
    w = _head_weight(a)
    a.drt_policy.on_attach(a, step=10)  # resuming keeps the drawn W
    assert _head_weight(a) is w
    assert not torch.equal(w, tiny_bert().classifier.weight)


def test_logits_are_alpha_times_w_x_and_only_alpha_trains() -> None:
    base = tiny_bert()
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_drt_model(base, FixedClassifierConfig())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["base_model.classifier.temperature"]
    assert model.get_nb_trainable_parameters()[0] == 1

    batch = random_bert_batch(torch.Generator().manual_seed(0), size=8)
    train_steps(model, [batch] * 3)
    alpha = model.get_base_model().classifier.temperature.detach()
    assert alpha != 1.0
    inputs = {"input_ids": batch["input_ids"]}
    with torch.no_grad():
        pooled = model.bert(**inputs).pooler_output
        logits = model(**inputs).logits
    assert torch.allclose(logits, alpha * pooled @ _head_weight(model).t(), atol=1e-6)  # no bias term
    after = dict(model.unload().named_parameters())
    assert after.keys() == before.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)  # nothing but α moved; the head is intact


def test_trained_bias_is_added_with_bias_all() -> None:
    model = get_drt_model(tiny_bert(), FixedClassifierConfig(bias="all", temperature_init=2.5))
    head = model.get_base_model().classifier
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "base_model.classifier.temperature",
        "base_model.classifier.base_layer.bias",
    }
    inputs = {"input_ids": random_bert_batch(torch.Generator().manual_seed(1))["input_ids"]}
    with torch.no_grad():
        expected = 2.5 * model.bert(**inputs).pooler_output @ head.fixed_weight.t() + head.base_layer.bias
        assert torch.allclose(model(**inputs).logits, expected, atol=1e-6)


def test_save_load_holds_no_head_matrix_and_merge_is_identical(tmp_path) -> None:
    model = get_drt_model(tiny_bert(), FixedClassifierConfig(seed=7))
    batch = random_bert_batch(torch.Generator().manual_seed(0), size=8)
    train_steps(model, [batch] * 3)
    inputs = {"input_ids": batch["input_ids"]}
    loaded = assert_save_load_roundtrip(model, tiny_bert(), inputs, tmp_path)
    with safe_open(os.path.join(tmp_path, "adapter_model.safetensors"), framework="pt") as handle:
        stored = {k: handle.get_tensor(k) for k in handle.keys()}
    probe = {"drt_base_probe_numels", "drt_base_probe_stats", "drt_base_probe_values"}  # 36 numbers of Θ(0)
    assert set(stored) == {"drt_counts", "drt_values", "drt_layer.0.temperature"} | probe
    assert max(t.numel() for k, t in stored.items() if k not in probe) == 1  # α and a count: no W, no head weight
    assert torch.equal(stored["drt_layer.0.temperature"], model.get_base_model().classifier.temperature.detach())
    assert DRTConfig.from_pretrained(tmp_path) == model.drt_config

    assert torch.equal(_head_weight(loaded), _head_weight(model))  # regenerated from the seed
    merged = assert_merge_matches(loaded, inputs, rtol=1e-5, atol=1e-6)
    assert type(merged.classifier) is nn.Linear
    assert torch.equal(merged.classifier.bias, torch.zeros(2))


def test_vit_from_scratch_trains_behind_the_fixed_head() -> None:
    batch = random_vit_batch(torch.Generator().manual_seed(3))
    base = tiny_vit()
    head_before = base.classifier.weight.detach().clone()
    vit_params = sum(p.numel() for p in base.vit.parameters())
    model = get_drt_model(base, FixedClassifierConfig(modules_to_save=["vit"]))
    assert model.get_nb_trainable_parameters()[0] == vit_params + 1
    w = _head_weight(model).clone()
    losses = train_steps(model, [batch] * 8, lr=3e-3)
    assert losses[-1] < losses[0]
    assert torch.equal(_head_weight(model), w)
    assert torch.equal(model.get_base_model().classifier.base_layer.weight, head_before)
    restored = model.unload()
    assert all(torch.equal(p, q) for p, q in zip(restored.parameters(), tiny_vit().parameters(), strict=True))


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match=r"target_modules='all-linear' is not supported by 'fixed_classifier'"):
        FixedClassifierConfig(target_modules="all-linear")
    with pytest.raises(ValueError, match=r"density=0\.5, num_trainable=None: 'fixed_classifier' decides itself"):
        FixedClassifierConfig(density=0.5)
    for value in (0, -1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match=r"temperature_init=.* is not allowed; use a finite number > 0"):
            FixedClassifierConfig(temperature_init=value)
    with pytest.raises(ValueError, match=r"mode='prune' is not supported by 'fixed_classifier'; use 'freeze'"):
        FixedClassifierConfig(mode="prune")
    with pytest.raises(ValueError, match=r"base_init='seeded' is not supported by 'fixed_classifier'"):
        FixedClassifierConfig(base_init="seeded")
    with pytest.raises(ValueError, match=r"target_modules=\('head',\) matches no module"):
        get_drt_model(tiny_bert(), FixedClassifierConfig(target_modules=["head"]))
    with pytest.raises(ValueError, match=r"cannot embed lm_head: its weight is tied"):
        get_drt_model(tiny_gpt2(), FixedClassifierConfig(target_modules=["lm_head"]))
    with pytest.raises(RuntimeError, match="has no fixed weight yet"):
        FixedClassifierLayer(nn.Linear(4, 2))(torch.randn(1, 4))
