"""State integrity: derived state follows ψ, loading is all-or-nothing, nothing non-finite or half-written is
saved, and misuse gets a clear error instead of silently wrong results."""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
from conftest import (
    adamw,
    assert_merge_matches,
    random_bert_batch,
    tiny_bert,
    tiny_convnet,
    train_steps,
    train_updating_masks,
)
from torch import nn

from drt_peft import DRTModel, RandomConfig, SETConfig, get_drt_model


def _trained_set(mode: str, density: float, seed: int) -> DRTModel:
    """A SET model whose mask moved during training (so ψ differs from the one a fresh model draws)."""
    model = get_drt_model(tiny_bert(), SETConfig(density=density, mode=mode, update_frequency=1, seed=seed))
    g = torch.Generator().manual_seed(seed)
    train_updating_masks(model, [random_bert_batch(g) for _ in range(3)])
    return model


@pytest.mark.parametrize("full", [False, True], ids=["training-state", "full-state-dict"])
@pytest.mark.parametrize(("mode", "density"), [("freeze", 0.2), ("prune", 0.2), ("prune", 0.02)])
def test_loading_another_mask_moves_the_effective_weight_and_kernels(mode: str, density: float, full: bool) -> None:
    source = _trained_set(mode, density, seed=1)
    target = _trained_set(mode, density, seed=2)  # its outputs were computed: kernels and Θ hold its own ψ
    batch = random_bert_batch(torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = source(**batch).logits
        target(**batch)
    state = source.state_dict() if full else source.training_state_dict()
    target.load_state_dict(state, strict=full)
    for (_, a), (_, b) in zip(source.drt_layers(), target.drt_layers(), strict=True):
        assert torch.equal(a.drt_indices, b.drt_indices) and torch.equal(a.effective_weight(), b.effective_weight())
    with torch.no_grad():
        assert torch.equal(target(**batch).logits, expected)
    assert_merge_matches(copy.deepcopy(target), batch, rtol=1e-5, atol=1e-5)


def test_loading_a_mask_of_another_size_resizes_the_layer() -> None:
    source = get_drt_model(tiny_bert(), RandomConfig(density=0.3))
    target = get_drt_model(tiny_bert(), RandomConfig(density=0.1))
    target.load_state_dict(source.training_state_dict(), strict=False)
    batch = random_bert_batch(torch.Generator().manual_seed(9))
    assert [layer.num_trainable for _, layer in target.drt_layers()] == [
        layer.num_trainable for _, layer in source.drt_layers()
    ]
    with torch.no_grad():
        assert torch.equal(target(**batch).logits, source(**batch).logits)
    train_steps(target, [batch])  # the resized values train


def test_failed_from_pretrained_leaves_the_base_as_it_was(tmp_path) -> None:
    model = get_drt_model(tiny_bert(), RandomConfig(density=0.2, bias="all", modules_to_save=["classifier"]))
    train_steps(model, [random_bert_batch(torch.Generator().manual_seed(0))])
    model.save_pretrained(tmp_path)
    three = tiny_bert(num_labels=3)
    three.bert.load_state_dict(tiny_bert().bert.state_dict())  # same backbone, another head
    three.bert.encoder.layer[0].attention.self.query.weight.requires_grad_(False)  # a flag of the caller's own
    before = {k: v.clone() for k, v in three.state_dict().items()}
    flags = [p.requires_grad for p in three.parameters()]
    types = [type(m) for m in three.modules()]
    with pytest.raises(ValueError, match=r"modules_to_save entry 'classifier' was saved with tensors"):
        DRTModel.from_pretrained(three, tmp_path)
    assert [type(m) for m in three.modules()] == types
    assert [p.requires_grad for p in three.parameters()] == flags
    for key, value in three.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_embedding_a_model_twice_is_refused() -> None:
    model = get_drt_model(tiny_bert(), RandomConfig(density=0.2))
    with pytest.raises(ValueError, match=r"already contains DRT layers .* call unload\(\) or merge_and_unload\(\)"):
        get_drt_model(model.get_base_model(), RandomConfig(density=0.2))


def test_dynamic_update_needs_the_optimizer_that_holds_the_values() -> None:
    model = get_drt_model(tiny_bert(), SETConfig(density=0.2, update_frequency=1))
    before = [layer.drt_indices.clone() for _, layer in model.drt_layers()]
    model(**random_bert_batch(torch.Generator().manual_seed(0))).loss.backward()
    with pytest.raises(ValueError, match=r"optimizer=None: SETConfig needs the optimizer"):
        model.update_masks(1, None)
    other = torch.optim.SGD(model.get_base_model().classifier.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"optimizer: the SGD passed to update_masks does not hold the trained"):
        model.update_masks(1, other)
    assert all(torch.equal(a, layer.drt_indices) for a, (_, layer) in zip(before, model.drt_layers(), strict=True))


def test_an_optimizer_built_before_get_drt_model_is_named_at_its_first_step() -> None:
    base = tiny_bert()
    stale = torch.optim.AdamW(base.parameters(), lr=1e-2)
    model = get_drt_model(base, RandomConfig(density=0.2))
    model(**random_bert_batch(torch.Generator().manual_seed(0))).loss.backward()
    with pytest.warns(UserWarning, match=r"built before get_drt_model and trains nothing of the adapter"):
        stale.step()
    good = adamw(model, lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        good.step()
        stale.step()  # warned once


def test_non_finite_values_are_never_saved_and_the_previous_adapter_stays(tmp_path) -> None:
    model = get_drt_model(tiny_bert(), RandomConfig(density=0.2))
    batch = random_bert_batch(torch.Generator().manual_seed(0))
    train_steps(model, [batch])
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        good = model(**batch).logits
        name, layer = next(iter(model.drt_layers()))
        layer.drt_values[0] = float("nan")
    with pytest.raises(ValueError, match=rf"not finite \(NaN or inf\): \['{name}'\]"):
        model.save_pretrained(tmp_path)
    loaded = DRTModel.from_pretrained(tiny_bert(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, good)


def test_a_save_cleans_up_what_an_interrupted_one_left(tmp_path) -> None:
    model = get_drt_model(tiny_bert(), RandomConfig(density=0.2))
    (tmp_path / ".tmp-k3j2adapter_model.safetensors").write_bytes(b"half a file")
    (tmp_path / ".tmp-x9README.md").write_bytes(b"half")
    (tmp_path / "notes.txt").write_text("the user's own file")
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "notes.txt",
    ]


def test_from_pretrained_refuses_unknown_keywords(tmp_path) -> None:
    get_drt_model(tiny_bert(), RandomConfig(density=0.2)).save_pretrained(tmp_path)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['is_trainble'\]"):
        DRTModel.from_pretrained(tiny_bert(), tmp_path, is_trainble=True)
    assert DRTModel.from_pretrained(tiny_bert(), tmp_path, revision="main").drt_config.method_name == "random"


def test_save_pretrained_takes_the_trainer_and_peft_keywords(tmp_path) -> None:
    model = get_drt_model(tiny_bert(), RandomConfig(density=0.2))
    model.save_pretrained(tmp_path / "skip", is_main_process=False)
    assert not (tmp_path / "skip").exists()
    with pytest.raises(ValueError, match=r"safe_serialization=False is not supported"):
        model.save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(ValueError, match=r"selected_adapters=\['other'\]: name adapters of this model, \['default'\]"):
        model.save_pretrained(tmp_path, selected_adapters=["other"])
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['shard'\]"):
        model.save_pretrained(tmp_path, shard=True)
    state = model.state_dict()  # a gathered state dict (as FSDP hands it) is what gets saved
    name, layer = next(iter(model.drt_layers()))
    state[f"base_model.{name}.drt_values"] = torch.full_like(layer.drt_values, 0.5)
    model.save_pretrained(tmp_path, state_dict=state, safe_serialization=True, selected_adapters=["default"])
    loaded = DRTModel.from_pretrained(tiny_bert(), tmp_path)
    assert (dict(loaded.drt_layers())[name].drt_values == 0.5).all()


def test_meta_device_models_get_a_clear_error() -> None:
    with torch.device("meta"):
        model = tiny_bert()
    with pytest.raises(ValueError, match=r"on the meta device .* load the real weights first"):
        get_drt_model(model, RandomConfig(density=0.2))


class _QuantLinear(nn.Linear):
    """Stands for a quantized linear layer: an nn.Linear subclass drt_peft cannot embed."""


def test_all_linear_names_the_linear_subclasses_it_leaves_out() -> None:
    net = tiny_convnet()
    net.extra = _QuantLinear(3, 3)
    with pytest.warns(UserWarning, match=r"leaves out 1 linear module.*\['extra \(_QuantLinear\)'\]"):
        model = get_drt_model(net, RandomConfig(density=0.5))
    assert [name for name, _ in model.drt_layers()] == ["fc"]


def test_drt_layers_expose_the_wrapped_module_attributes() -> None:
    model = get_drt_model(tiny_convnet(), RandomConfig(density=0.5, target_modules=["conv2", "fc"]))
    layers = dict(model.drt_layers())
    assert (layers["fc"].in_features, layers["fc"].out_features) == (54, 3)
    assert layers["fc"].weight is layers["fc"].base_layer.weight and layers["fc"].bias is layers["fc"].base_layer.bias
    conv = layers["conv2"]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride) == (4, 6, (3, 3), (2, 2))
    with pytest.raises(AttributeError):
        conv.no_such_attribute  # noqa: B018


def test_drt_models_pickle_and_copy(tmp_path) -> None:
    model = get_drt_model(tiny_bert(), RandomConfig(density=0.2))
    batch = random_bert_batch(torch.Generator().manual_seed(0))
    torch.save(model, tmp_path / "model.pt")
    for clone in (torch.load(tmp_path / "model.pt", weights_only=False), copy.deepcopy(model)):
        assert type(clone) is type(model) and type(clone).__name__ == "DRTModel[BertForSequenceClassification]"
        with torch.no_grad():
            assert torch.equal(clone(**batch).logits, model(**batch).logits)


def test_a_failed_get_drt_model_leaves_the_model_as_it_was() -> None:
    from drt_peft import DCTSparseConfig

    net = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(1, 1, 3))  # the DCT path embeds the Linear, then refuses the conv
    net[1].bias.requires_grad_(False)
    flags = [p.requires_grad for p in net.parameters()]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(TypeError, match="cannot embed a Conv2d with a DCT path"):
        get_drt_model(net, DCTSparseConfig(density=0.5, target_modules=["0", "1"]))
    assert [type(m) for m in net] == [nn.Linear, nn.Conv2d]
    assert [p.requires_grad for p in net.parameters()] == flags
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
