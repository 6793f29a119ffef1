"""DCT plus sparse: y = S·x + C·x + b with a fixed orthonormal DCT path C and a trained sparse S."""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import (
    assert_merge_matches,
    assert_save_load_roundtrip,
    random_bert_batch,
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

from drt_peft import DCTSparseConfig, get_drt_model
from drt_peft.layer.dct import DCTSparseLayer, dct_ii, partial_dct


def _textbook_dct(n: int) -> torch.Tensor:
    """C_kj = s_k cos(π(2j+1)k/(2n)), s_0 = √(1/n), s_k = √(2/n)."""
    k, j = torch.arange(n, dtype=torch.float64)[:, None], torch.arange(n, dtype=torch.float64)[None, :]
    scale = torch.full((n, 1), math.sqrt(2 / n), dtype=torch.float64)
    scale[0] = math.sqrt(1 / n)
    return scale * torch.cos(math.pi * (2 * j + 1) * k / (2 * n))


@pytest.mark.parametrize("n", [1, 2, 5, 8, 13, 32])
def test_dct_equals_the_textbook_formula_and_is_orthonormal(n: int) -> None:
    x = torch.randn(4, 3, n, dtype=torch.float64)
    c = _textbook_dct(n)
    assert torch.allclose(dct_ii(x), x @ c.t())
    assert torch.allclose(dct_ii(torch.eye(n, dtype=torch.float64)).t(), c)
    assert torch.allclose(c @ c.t(), torch.eye(n, dtype=torch.float64))
    assert torch.allclose(dct_ii(x.float()), (x @ c.t()).float(), atol=1e-5)


@pytest.mark.parametrize(("out", "inp"), [(5, 9), (9, 5), (7, 7)])
def test_non_square_path_is_a_partial_isometry(out: int, inp: int) -> None:
    c = partial_dct(torch.eye(inp, dtype=torch.float64), out).t()
    assert c.shape == (out, inp)
    assert torch.allclose(c, _textbook_dct(max(out, inp))[:out, :inp])
    if out <= inp:  # the first `out` coefficients of the DCT of x: orthonormal rows
        assert torch.allclose(c @ c.t(), torch.eye(out, dtype=torch.float64))
    if out >= inp:  # the DCT of x zero-padded to `out`: orthonormal columns, norms preserved
        assert torch.allclose(c.t() @ c, torch.eye(inp, dtype=torch.float64))


@pytest.mark.parametrize("module", [nn.Linear(9, 5), nn.Linear(5, 9), Conv1D(5, 9), Conv1D(9, 5)])
def test_layer_output_is_sparse_plus_dct(module: nn.Module) -> None:
    module = module.double()
    numel = module.weight.numel()
    indices = torch.randperm(numel, generator=torch.Generator().manual_seed(0))[:7].sort().values
    layer = DCTSparseLayer(module, indices, train_bias=True)
    assert layer.dct_scale.item() == 1.0  # α starts at 1, as in the authors' code
    with torch.no_grad():
        layer.drt_values.add_(torch.randn(7, dtype=torch.float64))
        layer.dct_scale.fill_(0.75)
    x = torch.randn(2, 3, layer.in_features, dtype=torch.float64, requires_grad=True)
    s = torch.zeros(numel, dtype=torch.float64)
    s[indices] = layer.drt_values.detach()
    s = layer.op.to_matrix(s.reshape(module.weight.shape))  # [out, in]
    c = _textbook_dct(max(layer.in_features, layer.out_features))[: layer.out_features, : layer.in_features]
    out = layer(x)
    assert torch.allclose(out, x @ (s + 0.75 * c).t() + module.bias)
    out.sum().backward()
    assert torch.allclose(x.grad, torch.ones_like(out) @ (s + 0.75 * c))
    assert torch.allclose(layer.dct_scale.grad.double(), (x.detach() @ c.t()).sum())
    grad_s = layer.op.to_matrix(torch.zeros(module.weight.shape, dtype=torch.float64))
    grad_s += torch.ones_like(out).reshape(-1, layer.out_features).t() @ x.detach().reshape(-1, layer.in_features)
    assert torch.allclose(layer.drt_values.grad, layer.op.from_matrix(grad_s).reshape(-1)[indices])
    assert torch.allclose(layer.merge().weight, layer.op.from_matrix(s + 0.75 * layer.dct_matrix()))


def test_bert_trains_theta_and_the_dct_scale_saves_loads_and_merges(tmp_path) -> None:
    base = tiny_bert()
    config = DCTSparseConfig(density=0.1, base_init="seeded", modules_to_save=["classifier"])
    model = get_drt_model(base, config)
    layers = [layer for _, layer in model.drt_layers()]
    assert all(isinstance(layer, DCTSparseLayer) for layer in layers)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    head = model.get_base_model().classifier
    expected = {id(p) for layer in layers for p in (layer.drt_values, layer.dct_scale)}
    assert trainable == expected | {id(p) for p in head.parameters()}
    g = torch.Generator().manual_seed(0)
    batch = random_bert_batch(g, size=8)
    losses = train_steps(model, [batch] * 6)
    assert losses[-1] < losses[0]
    assert all(layer.base_layer.weight.grad is None for layer in layers)
    assert all(layer.dct_scale.item() != 1.0 for layer in layers), "α did not train"

    inputs = {"input_ids": random_bert_batch(g)["input_ids"]}
    loaded = assert_save_load_roundtrip(model, tiny_bert(), inputs, tmp_path)
    pairs = zip(model.drt_layers(), loaded.drt_layers(), strict=True)
    assert all(torch.equal(a.dct_scale, b.dct_scale) for (_, a), (_, b) in pairs)
    with safe_open(os.path.join(tmp_path, "adapter_model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert not any(k.startswith("drt_index") for k in keys)  # ψ comes from the seed, C from the shape
    assert {k for k in keys if k.startswith("drt_layer.")} == {f"drt_layer.{i}.dct_scale" for i in range(len(layers))}
    assert_merge_matches(loaded, inputs, rtol=1e-5, atol=1e-5)


def test_an_adapter_saved_without_the_dct_scale_loads_with_scale_one() -> None:
    layer = DCTSparseLayer(nn.Linear(6, 4), torch.tensor([1, 5, 9]))
    with torch.no_grad():
        layer.dct_scale.fill_(0.5)
    layer.load_adapter_tensors({"dct_scale": torch.tensor(0.25)})
    assert layer.dct_scale.item() == 0.25
    layer.load_adapter_tensors({})  # saved before α trained: the DCT path as it was then
    assert layer.dct_scale.item() == 1.0
    with pytest.raises(ValueError, match=r"DCTSparseLayer stores only \['dct_scale'\], got \['scale'\]"):
        layer.load_adapter_tensors({"scale": torch.tensor(1.0)})


def test_gpt2_conv1d_layers_merge_to_the_same_function() -> None:
    model = get_drt_model(tiny_gpt2(), DCTSparseConfig(density=0.02))
    shapes = {(layer.out_features, layer.in_features) for _, layer in model.drt_layers()}
    assert {(96, 32), (32, 32), (128, 32), (32, 128)} <= shapes  # out > in, square, out < in
    assert all(layer.sparse_kernels for _, layer in model.drt_layers())  # S runs on CSR kernels
    input_ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    assert_merge_matches(model, {"input_ids": input_ids}, rtol=1e-5, atol=1e-5)


def test_vision_transformer_trains() -> None:
    batch = random_vit_batch(torch.Generator().manual_seed(3))
    model = get_drt_model(tiny_vit(), DCTSparseConfig(density=0.2, base_init="seeded"))
    before = [layer.drt_values.detach().clone() for _, layer in model.drt_layers()]
    losses = train_steps(model, [batch] * 6)
    assert losses[-1] < losses[0]
    assert all(not torch.equal(b, la.drt_values) for b, (_, la) in zip(before, model.drt_layers(), strict=True))


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError, match=r"mode='freeze' is not supported by 'dct_sparse'; use 'prune'"):
        DCTSparseConfig(density=0.1, mode="freeze")
    with pytest.raises(TypeError, match="cannot embed a Conv2d with a DCT path"):
        get_drt_model(tiny_convnet(), DCTSparseConfig(density=0.1, target_modules=["conv1"]))
