"""get_drt_model on transformers models: only d entries train, compact optimizer state, exits."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    adamw,
    assert_merge_matches,
    tiny_bert,
    tiny_convnet,
    tiny_gpt2,
    tiny_llama,
    tiny_mlp,
    tiny_vit,
    train_steps,
)

from drt_peft import DRTModel, MagnitudeConfig, RandomConfig, get_drt_model
from drt_peft.layer.layer import CSR_MAX_DENSITY


def _train(model: DRTModel, batch: dict, steps: int = 3, lr: float = 1e-2) -> torch.optim.Optimizer:
    optimizer = adamw(model, lr=lr, weight_decay=0.1)
    train_steps(model, [batch] * steps, optimizer=optimizer)
    return optimizer


@pytest.mark.parametrize(("mode", "density"), [("freeze", 0.1), ("prune", 0.1), ("prune", 0.02)])
def test_only_the_trained_entries_change(mode: str, density: float, bert_batch: dict) -> None:
    base = tiny_bert()
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_drt_model(base, RandomConfig(density=density, mode=mode, modules_to_save=["classifier"]))
    assert all(
        layer.sparse_kernels == (mode == "prune" and density < CSR_MAX_DENSITY) for _, layer in model.drt_layers()
    )
    optimizer = _train(model, bert_batch)
    masks = model.get_masks()
    assert masks, "no layer was embedded"
    for name, layer in model.drt_layers():
        mask = masks[name]
        assert mask.sum() == layer.num_trainable == round(density * mask.numel())
        old = before[f"{name}.weight"]
        new = layer.effective_weight()
        changed = new != (old if mode == "freeze" else torch.where(mask, old, torch.zeros_like(old)))
        assert not (changed & ~mask).any(), f"{name}: an untrained entry changed"
        assert changed[mask].sum() == layer.num_trainable, f"{name}: not every trained entry moved"
        assert layer.base_layer.weight.grad is None
        state = optimizer.state[layer.drt_values]
        assert state["exp_avg"].numel() + state["exp_avg_sq"].numel() == 2 * layer.num_trainable
        assert torch.equal(new.reshape(-1)[layer.drt_indices], layer.drt_values.detach())
    embedded = {f"{name}.base_layer.weight" for name in masks}
    checked = 0
    for name, param in base.named_parameters():
        if name.startswith("classifier") or name.endswith("drt_values") or name in embedded:
            continue
        assert torch.equal(param, before[name.replace(".base_layer", "")]), f"{name} changed but is frozen"
        checked += 1
    assert checked > 20  # embeddings, LayerNorms, biases


def test_optimizer_sees_only_d_values_and_the_head(bert_batch: dict) -> None:
    model = get_drt_model(tiny_bert(), RandomConfig(density=0.05, modules_to_save=["classifier"]))
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    d = sum(layer.num_trainable for _, layer in model.drt_layers())
    head = sum(p.numel() for p in model.get_base_model().classifier.parameters())
    assert sum(trainable.values()) == d + head
    assert all(n.endswith("drt_values") or ".classifier." in n for n in trainable)
    assert model.get_nb_trainable_parameters() == (d + head, sum(p.numel() for p in tiny_bert().parameters()))


def test_all_linear_excludes_the_output_head() -> None:
    bert = get_drt_model(tiny_bert(), RandomConfig(density=0.1))
    assert not any(n.startswith("classifier") for n, _ in bert.drt_layers())
    gpt2 = get_drt_model(tiny_gpt2(), RandomConfig(density=0.1))
    names = [n for n, _ in gpt2.drt_layers()]
    assert "lm_head" not in names and "transformer.h.0.attn.c_attn" in names


def test_base_model_is_the_backbone_and_get_base_model_the_wrapped_model() -> None:
    wrapped = tiny_llama()
    model = get_drt_model(wrapped, RandomConfig(density=0.2))
    assert model.get_base_model() is wrapped
    assert model.base_model is wrapped.model  # as on the transformers model: the backbone, without the LM head
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids).last_hidden_state  # what TRL's fused LM head runs
        assert torch.equal(model.get_output_embeddings()(hidden), model(input_ids=ids).logits)
    assert all(key.startswith("base_model.") for key in model.state_dict())  # checkpoints keep their keys
    assert model.unload() is wrapped
    plain = get_drt_model(tiny_mlp(), RandomConfig(density=0.5))
    assert plain.base_model is plain.get_base_model()  # a model without a backbone of its own is its own


def test_merge_and_unload_reproduce_logits(bert_batch: dict) -> None:
    inputs = {"input_ids": bert_batch["input_ids"]}
    original = tiny_bert()(**inputs).logits
    for mode in ("freeze", "prune"):
        model = get_drt_model(tiny_bert(), MagnitudeConfig(density=0.2, mode=mode, modules_to_save=["classifier"]))
        _train(model, bert_batch)
        merged = assert_merge_matches(model, inputs)
        if mode == "prune":
            weight = merged.bert.encoder.layer[0].intermediate.dense.weight
            assert (weight == 0).float().mean() == pytest.approx(0.8, abs=0.01)
    model = get_drt_model(tiny_bert(), RandomConfig(density=0.2, mode="prune", modules_to_save=["classifier"]))
    _train(model, bert_batch)
    restored = model.unload()
    assert torch.equal(restored(**inputs).logits, original)
    assert {n for n, _ in restored.named_parameters()} == {n for n, _ in tiny_bert().named_parameters()}


def test_freeze_mode_starts_at_the_base_function(bert_batch: dict) -> None:
    inputs = {"input_ids": bert_batch["input_ids"]}
    expected = tiny_bert()(**inputs).logits
    model = get_drt_model(tiny_bert(), RandomConfig(density=0.1))
    assert torch.equal(model(**inputs).logits, expected)


def test_seeded_base_init_is_regenerable() -> None:
    config = RandomConfig(density=0.1, base_init="seeded", seed=3)
    a = get_drt_model(tiny_bert(seed=0), config)
    b = get_drt_model(tiny_bert(seed=1), config)
    pretrained = tiny_bert(seed=0).bert.encoder.layer[0].attention.self.query.weight
    for (name, la), (_, lb) in zip(a.drt_layers(), b.drt_layers(), strict=True):
        assert torch.equal(la.base_layer.weight, lb.base_layer.weight), name
    query = a.get_base_model().bert.encoder.layer[0].attention.self.query.base_layer.weight
    assert not torch.equal(query, pretrained)
    assert query.std().item() == pytest.approx(0.02, rel=0.2)  # BERT's initializer_range
    assert a.drt_config.base_model_fingerprint == b.drt_config.base_model_fingerprint


def test_bias_all_trains_the_targeted_biases(bert_batch: dict) -> None:
    base = tiny_bert()
    before = base.bert.encoder.layer[0].output.dense.bias.detach().clone()
    model = get_drt_model(base, RandomConfig(density=0.1, bias="all"))
    _train(model, bert_batch)
    after = model.get_base_model().bert.encoder.layer[0].output.dense.base_layer.bias
    assert after.requires_grad and not torch.equal(after, before)
    assert not model.get_base_model().bert.embeddings.LayerNorm.bias.requires_grad


def test_vision_transformer_and_conv_models() -> None:
    vit = get_drt_model(tiny_vit(), RandomConfig(density=0.1, modules_to_save=["classifier"]))
    pixels = torch.randn(2, 1, 16, 16)
    loss = vit(pixel_values=pixels, labels=torch.tensor([0, 2])).loss
    loss.backward()
    assert all(layer.drt_values.grad is not None for _, layer in vit.drt_layers())
    conv = get_drt_model(tiny_convnet(), MagnitudeConfig(density=0.3, target_modules=["conv1", "depthwise", "conv2"]))
    conv(torch.randn(2, 2, 8, 8)).sum().backward()
    assert len(list(conv.drt_layers())) == 3
    assert all(layer.drt_values.grad.abs().sum() > 0 for _, layer in conv.drt_layers())


def test_target_modules_regex_and_errors() -> None:
    model = get_drt_model(tiny_bert(), RandomConfig(density=0.1, target_modules=r".*attention\.self\.(query|value)"))
    assert len(list(model.drt_layers())) == 4
    with pytest.raises(ValueError, match="target_modules=\\('nothing_here',\\) matches no module"):
        get_drt_model(tiny_bert(), RandomConfig(density=0.1, target_modules=["nothing_here"]))
    with pytest.raises(ValueError, match="unsupported modules"):
        get_drt_model(tiny_bert(), RandomConfig(density=0.1, target_modules=["word_embeddings"]))
    with pytest.raises(ValueError, match="modules_to_save entry 'head'"):
        get_drt_model(tiny_bert(), RandomConfig(density=0.1, modules_to_save=["head"]))
    with pytest.raises(ValueError, match="tied"):
        get_drt_model(tiny_gpt2(), RandomConfig(density=0.1, target_modules=["lm_head"]))
