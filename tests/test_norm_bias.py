"""Norm-/bias-only training: only normalisation affine parameters and/or targeted biases train."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    assert_save_load_roundtrip,
    outputs,
    random_bert_batch,
    random_lm_batch,
    random_vit_batch,
    tiny_bert,
    tiny_convnet,
    tiny_gpt2,
    tiny_vit,
    train_steps,
)
from safetensors import safe_open
from torch import nn
from transformers.pytorch_utils import Conv1D

import drt_peft.layer.layer as layer_module
from drt_peft import DRTConfig, DRTLayer, NormBiasConfig, get_drt_model
from drt_peft.layer import weight_op
from drt_peft.methods.norm_bias import norm_layer_names

CHOICES = ("norm", "bias", "norm_and_bias")


def _expected_trainable(base: nn.Module, train: str, backbone: str) -> set[str]:
    """Parameter names by hand: LayerNorm weights/biases, and biases of the backbone's Linear/Conv1D layers."""
    names: set[str] = set()
    for name, module in base.named_modules():
        if train in ("norm", "norm_and_bias") and isinstance(module, nn.LayerNorm):
            names |= {f"{name}.weight", f"{name}.bias"}
        if (
            train in ("bias", "norm_and_bias")
            and isinstance(module, (nn.Linear, Conv1D))
            and name.startswith(backbone + ".")
            and module.bias is not None
        ):
            names.add(f"{name}.bias")
    return names


def _is_key_bias(name: str) -> bool:
    """Attention key biases get no gradient: the softmax over keys ignores the shift q·b_k."""
    return name.endswith(("attention.self.key.bias", "attention.k_proj.bias"))


def _plain_name(name: str) -> str:
    return name.removeprefix("base_model.").replace("base_layer.", "")


def _bert_batch() -> dict[str, torch.Tensor]:
    return random_bert_batch(torch.Generator().manual_seed(0), size=8)


@pytest.mark.parametrize("train", CHOICES)
def test_only_norms_and_targeted_biases_train_on_bert(train: str) -> None:
    before = dict(tiny_bert().named_parameters())
    model = get_drt_model(tiny_bert(), NormBiasConfig(train=train))
    expected = _expected_trainable(tiny_bert(), train, "bert")
    trainable = {_plain_name(n) for n, p in model.named_parameters() if p.requires_grad and p.numel()}
    assert trainable == expected
    # the count is the hand count of norm parameters and biases, nothing of the weight matrices
    assert model.get_nb_trainable_parameters()[0] == sum(before[n].numel() for n in expected)
    assert all(layer.num_trainable == 0 for _, layer in model.drt_layers())

    train_steps(model, [_bert_batch()] * 4)
    after = dict(model.merge_and_unload().named_parameters())
    assert after.keys() == before.keys()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed <= expected
    assert {n for n in expected if not _is_key_bias(n)} <= changed  # every trainable parameter moved
    assert all(torch.equal(before[n], after[n]) for n in before if n.endswith(".weight") and after[n].dim() == 2)


@pytest.mark.parametrize("train", CHOICES)
def test_print_reports_the_hand_count(train: str, capsys: pytest.CaptureFixture[str]) -> None:
    base = tiny_bert()
    hand = sum(p.numel() for n, p in base.named_parameters() if n in _expected_trainable(base, train, "bert"))
    head = sum(p.numel() for p in base.classifier.parameters())
    total = sum(p.numel() for p in base.parameters())
    get_drt_model(base, NormBiasConfig(train=train, modules_to_save=["classifier"])).print_trainable_parameters()
    assert f"trainable params: {hand + head:,d} || all params: {total:,d}" in capsys.readouterr().out


def test_save_load_identical_and_unload_restores_everything(tmp_path) -> None:
    original = tiny_bert().state_dict()
    model = get_drt_model(tiny_bert(), NormBiasConfig(modules_to_save=["classifier"]))
    train_steps(model, [_bert_batch()] * 4)
    inputs = {"input_ids": _bert_batch()["input_ids"]}
    assert not torch.equal(outputs(model, inputs), outputs(tiny_bert(), inputs))

    assert_save_load_roundtrip(model, tiny_bert(), inputs, tmp_path)
    with safe_open(os.path.join(tmp_path, "adapter_model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
        biases = handle.get_tensor("drt_biases")
    assert not any(k.startswith("drt_index") for k in keys)  # ψ is empty and not stored
    assert "modules_to_save.bert.embeddings.LayerNorm.weight" in keys
    assert "modules_to_save.classifier.weight" in keys
    bias_names = _expected_trainable(tiny_bert(), "bias", "bert")
    assert biases.numel() == sum(p.numel() for n, p in tiny_bert().named_parameters() if n in bias_names)
    assert not any("dense.weight" in k or "query.weight" in k for k in keys)  # no weight matrix
    assert DRTConfig.from_pretrained(tmp_path) == model.drt_config

    restored = model.unload()
    state = restored.state_dict()
    assert state.keys() == original.keys()
    assert all(torch.equal(state[k], original[k]) for k in original)


@pytest.mark.parametrize("train", CHOICES)
def test_gpt2_trains_and_unloads(train: str) -> None:
    original = tiny_gpt2().state_dict()
    model = get_drt_model(tiny_gpt2(), NormBiasConfig(train=train))
    expected = _expected_trainable(tiny_gpt2(), train, "transformer")
    assert {_plain_name(n) for n, p in model.named_parameters() if p.requires_grad and p.numel()} == expected
    losses = train_steps(model, [random_lm_batch(torch.Generator().manual_seed(2), length=12)] * 6)
    assert losses[-1] < losses[0]
    restored = model.unload()
    assert all(torch.equal(restored.state_dict()[k], original[k]) for k in original)


def test_vit_trains_norms_and_biases_and_its_head() -> None:
    batch = random_vit_batch(torch.Generator().manual_seed(3))
    before = dict(tiny_vit().named_parameters())
    model = get_drt_model(tiny_vit(), NormBiasConfig(modules_to_save=["classifier"]))
    losses = train_steps(model, [batch] * 6)
    assert losses[-1] < losses[0]
    after = dict(model.merge_and_unload().named_parameters())
    expected = _expected_trainable(tiny_vit(), "norm_and_bias", "vit") | {"classifier.weight", "classifier.bias"}
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed <= expected
    assert {n for n in expected if not _is_key_bias(n)} <= changed


class _CustomRMSNorm(nn.Module):
    """A transformers-style norm recognised by its class name."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class _GatedNorm(nn.Module):
    """Named like a norm, but holds a Linear: not a plain normalisation layer."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.gate = nn.Linear(size, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.sigmoid(self.gate(x))


class _NormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.plain_ln = nn.LayerNorm(36, elementwise_affine=False)
        self.fc = nn.Linear(36 * 4, 8)
        self.rms = _CustomRMSNorm(8)
        self.gated = _GatedNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.gn(self.bn(self.conv(x)))
        x = self.plain_ln(x.flatten(2)).flatten(1)
        logits = self.head(self.gated(self.rms(self.fc(x))))
        return logits, F.cross_entropy(logits, labels)


def test_norm_matching_rules_and_batchnorm_statistics_round_trip(tmp_path) -> None:
    net = _NormNet()
    # affine torch norms and a class named ...Norm; not the non-affine LayerNorm, not a norm holding a Linear
    assert norm_layer_names(net) == ["bn", "gn", "rms"]
    original = {k: v.clone() for k, v in net.state_dict().items()}
    model = get_drt_model(net, NormBiasConfig(train="norm", target_modules=["fc", "head"]))
    assert model.modules_to_save == ["bn", "gn", "rms"]
    assert model.get_nb_trainable_parameters()[0] == 4 + 4 + 4 + 4 + 8
    g = torch.Generator().manual_seed(0)
    x, labels = torch.randn(5, 2, 6, 6, generator=g), torch.randint(0, 3, (5,), generator=g)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(3):
        model(x, labels)[1].backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert not torch.equal(model.get_base_model().bn.running_mean, original["bn.running_mean"])
    loaded = assert_save_load_roundtrip(model, _NormNet(), (x, labels), tmp_path)
    assert torch.equal(loaded.get_base_model().bn.running_var, model.get_base_model().bn.running_var)
    restored = model.unload().state_dict()
    assert all(torch.equal(restored[k], original[k]) for k in original)


def test_a_layer_with_no_trained_entry_skips_the_sampled_product(monkeypatch: pytest.MonkeyPatch) -> None:
    class Refuse:
        @staticmethod
        def apply(*args: object) -> None:
            raise AssertionError("the sampled product ran for a layer with no trained entry")

    monkeypatch.setattr(layer_module, "SampledWeightFunction", Refuse)
    empty = torch.empty(0, dtype=torch.int64)
    for module, mode, shape in [
        (nn.Linear(5, 3), "freeze", (2, 4, 5)),
        (nn.Linear(5, 3), "prune", (2, 4, 5)),
        (Conv1D(3, 5), "freeze", (2, 4, 5)),
        (nn.Conv2d(2, 3, 3, padding=1), "freeze", (2, 2, 6, 6)),
    ]:
        module = module.double()
        layer = DRTLayer(module, empty, mode, train_bias=True)
        weight = module.weight.detach().clone() if mode == "freeze" else torch.zeros_like(module.weight)
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_(True)
        bias_ref = module.bias.detach().clone().requires_grad_(True)
        out = layer(x)
        expected = weight_op(module).forward(x_ref, weight, bias_ref)
        assert torch.allclose(out, expected)
        grad = torch.randn_like(out)
        out.backward(grad)
        expected.backward(grad)
        assert torch.allclose(x.grad, x_ref.grad)  # the input gradient still flows
        assert torch.allclose(module.bias.grad, bias_ref.grad)
        assert module.weight.grad is None and layer.drt_values.grad is None


def test_bad_values_are_refused() -> None:
    choices = r"\['norm', 'bias', 'norm_and_bias'\]"
    with pytest.raises(ValueError, match=r"train='weights' is not supported; use one of " + choices):
        NormBiasConfig(train="weights")
    with pytest.raises(ValueError, match=r"density=0\.1, num_trainable=None: 'norm_bias' decides itself what trains"):
        NormBiasConfig(density=0.1)
    with pytest.raises(ValueError, match=r"num_trainable=10: 'norm_bias'"):
        NormBiasConfig(num_trainable=10)
    with pytest.raises(ValueError, match=r"bias='all' contradicts train='norm'; leave bias unset"):
        NormBiasConfig(train="norm", bias="all")
    with pytest.raises(ValueError, match=r"bias='none' contradicts train='bias'"):
        NormBiasConfig(train="bias", bias="none")
    with pytest.raises(ValueError, match=r"mode='prune' is not supported by 'norm_bias'; use 'freeze'"):
        NormBiasConfig(mode="prune")
    with pytest.raises(ValueError, match=r"budget='erk' is not supported by 'norm_bias'; use 'uniform'"):
        NormBiasConfig(budget="erk")
    with pytest.raises(ValueError, match=r"train='norm': TinyConvNet has no normalisation layer"):
        get_drt_model(tiny_convnet(), NormBiasConfig(train="norm", target_modules=["fc"]))
    no_bias = nn.Sequential(nn.Linear(4, 4, bias=False), nn.LayerNorm(4))
    with pytest.raises(ValueError, match=r"train='bias': none of the 1 modules that target_modules=\('0',\) selects"):
        get_drt_model(no_bias, NormBiasConfig(train="bias", target_modules=["0"]))
    config = NormBiasConfig(train="bias")
    assert config.bias == "all" and DRTConfig.from_dict(config.to_dict()) == config
