"""Intrinsic dimension: Θ = Θ(0) + P·ϑ with a Fastfood P regenerated from the seed."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import (
    Parity,
    assert_merge_matches,
    assert_save_load_roundtrip,
    cpu_training_args,
    random_bert_batch,
    random_vit_batch,
    tiny_bert,
    tiny_vit,
    train_steps,
)
from safetensors import safe_open

from drt_peft import DRTModel, DRTTrainer, IntrinsicDimensionConfig, get_drt_model
from drt_peft.layer.projected import hadamard


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def _projection_matrix(model: DRTModel) -> torch.Tensor:
    """P ∈ R^(D×d), built column by column by applying each layer's transform to the unit vectors."""
    layers = [layer for _, layer in model.drt_layers()]
    eye = torch.eye(layers[0].theta.numel(), dtype=torch.float64)
    return torch.stack([torch.cat([layer.project(e).reshape(-1) for layer in layers]) for e in eye], dim=1)


def test_hadamard_equals_the_explicit_matrix() -> None:
    for n in (1, 2, 4, 8, 16, 32):
        x = torch.randn(3, 2, n, dtype=torch.float64)
        assert torch.allclose(hadamard(x), x @ _sylvester(n)), n
        bits = torch.arange(n)
        popcount = sum(((bits[:, None] & bits[None, :]) >> b) & 1 for b in range(6))
        assert torch.equal(hadamard(torch.eye(n, dtype=torch.float64)), (-1.0) ** popcount)
    with pytest.raises(ValueError, match="power-of-two length, got 6"):
        hadamard(torch.ones(6))


def test_each_block_is_the_fastfood_product_and_p_has_unit_columns() -> None:
    model = get_drt_model(tiny_bert().double(), IntrinsicDimensionConfig(num_trainable=5))
    layer = model.get_base_model().bert.encoder.layer[1].intermediate.dense
    blocks, n = layer.fastfood_signs.shape
    assert n == 8 and blocks * n == layer.base_layer.weight.numel()
    eye = torch.eye(5, dtype=torch.float64)
    columns = torch.stack([layer.project(e).reshape(-1) for e in eye], dim=1).reshape(blocks, n, 5)
    h = _sylvester(n)
    for b in range(blocks):
        positions = layer.fastfood_permutation[b].long() - b * n
        assert torch.equal(positions.sort().values, torch.arange(n))
        perm = torch.zeros(n, n, dtype=torch.float64)
        perm[torch.arange(n), positions] = 1.0  # (Πy)_i = y_π(i)
        signs = layer.fastfood_signs[b].double()
        assert set(signs.tolist()) <= {-1.0, 1.0}
        v = h @ torch.diag(layer.fastfood_gauss[b]) @ perm @ h @ torch.diag(signs)
        assert torch.allclose(columns[b], v[:, :5])
    # every D_l of the tiny BERT is a multiple of n = 8, so the columns of P have unit norm exactly
    assert torch.allclose(_projection_matrix(model).norm(dim=0), torch.ones(5, dtype=torch.float64))


def test_training_stays_in_the_column_space_of_p() -> None:
    base = tiny_bert().double()
    original = {n: m.weight.detach().clone() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    d = 24
    model = get_drt_model(base, IntrinsicDimensionConfig(num_trainable=d, modules_to_save=["classifier"]))
    g = torch.Generator().manual_seed(0)
    train_steps(model, [random_bert_batch(g) for _ in range(4)], lr=5e-2)
    layers = list(model.drt_layers())
    theta = layers[0][1].theta.detach()
    delta = torch.cat([(layer.effective_weight() - original[name]).reshape(-1) for name, layer in layers])
    p = _projection_matrix(model)
    solution = torch.linalg.lstsq(p, delta[:, None]).solution
    residual = (p @ solution).squeeze(1) - delta
    assert delta.norm() > 1e-3
    assert residual.norm() <= 1e-10 * delta.norm()
    assert torch.allclose(solution.squeeze(1), theta)


def test_only_theta_trains_and_it_is_counted_once(capsys) -> None:
    d = 40
    model = get_drt_model(tiny_bert(), IntrinsicDimensionConfig(num_trainable=d, modules_to_save=["classifier"]))
    layers = [layer for _, layer in model.drt_layers()]
    theta = layers[0].theta
    assert all(layer.theta is theta for layer in layers)
    trainable = [p for p in model.parameters() if p.requires_grad]
    classifier = list(model.get_base_model().classifier.parameters())
    assert len(trainable) == 1 + len(classifier) and any(p is theta for p in trainable)
    for layer in layers:
        assert not layer.base_layer.weight.requires_grad and not layer.base_layer.bias.requires_grad
        assert layer.drt_indices.numel() == 0 and (layer is layers[0] or layer.drt_values.numel() == 0)
    n_classifier = sum(p.numel() for p in classifier)
    assert model.get_nb_trainable_parameters()[0] == d + n_classifier
    assert model.drt_statistics()["drt/trainable"] == d
    model.print_trainable_parameters()
    assert f"trainable params: {d + n_classifier:,d} ||" in capsys.readouterr().out
    g = torch.Generator().manual_seed(1)
    model(**random_bert_batch(g)).loss.backward()
    assert theta.grad is not None and theta.grad.abs().sum() > 0
    assert all(layer.base_layer.weight.grad is None for layer in layers)


def test_projection_is_regenerated_from_the_seed_and_differs_per_layer() -> None:
    theta = torch.randn(30)

    def outputs(seed: int) -> list[torch.Tensor]:
        model = get_drt_model(tiny_bert(), IntrinsicDimensionConfig(num_trainable=30, seed=seed))
        return [layer.project(theta) for _, layer in model.drt_layers()]

    first, again, other = outputs(0), outputs(0), outputs(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not any(torch.allclose(a, b) for a, b in zip(first, other, strict=True))
    assert first[0].shape == first[1].shape and not torch.allclose(first[0], first[1])  # query vs key


def test_save_load_merge_unload(tmp_path) -> None:
    base = tiny_bert()
    original = base.bert.encoder.layer[0].output.dense.weight.detach().clone()
    d = 500
    model = get_drt_model(base, IntrinsicDimensionConfig(num_trainable=d, modules_to_save=["classifier"], seed=3))
    g = torch.Generator().manual_seed(2)
    train_steps(model, [random_bert_batch(g) for _ in range(3)], lr=5e-2)
    inputs = {"input_ids": random_bert_batch(g)["input_ids"]}
    logits = model(**inputs).logits
    loaded = assert_save_load_roundtrip(model, tiny_bert(), inputs, tmp_path)

    file = os.path.join(tmp_path, "adapter_model.safetensors")
    with safe_open(file, framework="pt") as handle:
        keys = set(handle.keys())
        names = len(handle.metadata()["drt_layers"])  # the layers' names and shapes, for drt-peft inspect
    assert not any(k.startswith("drt_index") for k in keys) and not any(k.startswith("drt_layer.") for k in keys)
    classifier_bytes = sum(p.numel() * 4 for p in model.get_base_model().classifier.parameters())
    assert 4 * d < os.path.getsize(file) - classifier_bytes - names < 4 * d + 4096

    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = DRTModel.from_pretrained(tiny_bert(), tmp_path, is_trainable=True)
    trainable.drt_policy.on_attach(trainable, step=3)  # resuming does not reset ϑ
    assert torch.equal(trainable(**inputs).logits, logits)

    assert_merge_matches(loaded, inputs, rtol=1e-5, atol=1e-6)
    unloaded = model.unload()
    assert torch.equal(unloaded.bert.encoder.layer[0].output.dense.weight, original)


def test_trainer_checkpoints_resume_theta(tmp_path) -> None:
    def run(resume: bool) -> torch.Tensor:
        model = get_drt_model(tiny_bert(), IntrinsicDimensionConfig(num_trainable=50, modules_to_save=["classifier"]))
        args = cpu_training_args(
            tmp_path, per_device_train_batch_size=16, max_steps=4, learning_rate=0.05,
            save_strategy="steps", save_steps=2,
        )  # fmt: skip
        DRTTrainer(model=model, args=args, train_dataset=Parity(64)).train(resume_from_checkpoint=resume or None)
        return next(layer for _, layer in model.drt_layers()).theta.detach()

    trained = run(resume=False)
    assert trained.abs().sum() > 0
    assert torch.equal(run(resume=True), trained)  # restored from checkpoint-4, not reset to 0


def test_vision_transformer_trains() -> None:
    batch = random_vit_batch(torch.Generator().manual_seed(4))
    model = get_drt_model(tiny_vit(), IntrinsicDimensionConfig(density=0.01))
    d = model.drt_statistics()["drt/trainable"]
    total = sum(layer.base_layer.weight.numel() for _, layer in model.drt_layers())
    assert d == round(0.01 * total)
    losses = train_steps(model, [batch] * 8, lr=0.1)
    assert losses[-1] < losses[0]


def test_invalid_settings_name_field_value_and_allowed() -> None:
    with pytest.raises(ValueError, match=r"mode='prune' is not supported by 'intrinsic_dimension'; use 'freeze'"):
        IntrinsicDimensionConfig(num_trainable=10, mode="prune")
    with pytest.raises(ValueError, match=r"budget='erk' .* use 'uniform'"):
        IntrinsicDimensionConfig(num_trainable=10, budget="erk")
    with pytest.raises(ValueError, match=r"structure='rows' .* use 'unstructured'"):
        IntrinsicDimensionConfig(num_trainable=10, structure="rows")
    with pytest.raises(ValueError, match=r"num_trainable=100000 exceeds"):
        get_drt_model(tiny_bert(), IntrinsicDimensionConfig(num_trainable=100_000))
