"""One conformance suite over every registered method, on every tiny model it applies to.

Each method is built from its config class with the defaults plus the small settings in
``SMALL`` (wherever it has such a field), so a newly registered method is tested here without
adding anything. Per method and model: a few training steps with the method's own per-step policy,
save → load identical outputs, ``merge_and_unload`` identical outputs, ``unload`` gives the base back
exactly, a bf16 autocast step; per method on BERT: the ``Trainer`` trains, evaluates (loss and
metrics), checkpoints the compact adapter and resumes bit-identically.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from conftest import (
    Parity,
    assert_merge_matches,
    assert_save_load_roundtrip,
    cpu_training_args,
    outputs,
    random_bert_batch,
    random_lm_batch,
    tiny_bert,
    tiny_convnet,
    tiny_gpt2,
    tiny_llama,
    tiny_vit,
    train_updating_masks,
)
from torch import nn

from drt_peft import DRTModel, DRTTrainer, available_methods, get_drt_model
from drt_peft.config import DRTConfig, config_class

#: Small settings for fields a method may have, so every method runs in a few steps.
SMALL: dict[str, Any] = {
    "update_frequency": 2,
    "accumulation_steps": 2,
    "t_end": 6,
    "num_batches": 1,
    "rounds": 2,
    "num_samples": 4,
}
STEPS = 6


def _pixel_batch(
    g: torch.Generator, channels: int, size: int, classes: int, key: str = "pixel_values"
) -> dict[str, torch.Tensor]:
    return {key: torch.randn(4, channels, size, size, generator=g), "labels": torch.randint(0, classes, (4,))}


class Kind:
    """A tiny model kind: how to build it, its batches, its loss and its classification head (if any)."""

    def __init__(
        self,
        build: Callable[[], nn.Module],
        batch: Callable[[torch.Generator], dict[str, torch.Tensor]],
        head: str | None,
        loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor] | None = None,
    ) -> None:
        self.build, self.batch, self.head, self.loss_fn = build, batch, head, loss_fn

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss_fn(model, batch) if self.loss_fn else model(**batch).loss

    def inputs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]:
        """What the model is called on: the images of the CNN, the batch less its labels otherwise."""
        if self.loss_fn:
            return batch["x"]
        return {k: v for k, v in batch.items() if k != "labels"}


def _convnet_loss(model: nn.Module, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """The CNN's loss; GraSP passes its ``temperature``, which divides the logits."""
    return nn.functional.cross_entropy(model(batch["x"]) / temperature, batch["labels"])


KINDS = {
    "bert": Kind(tiny_bert, lambda g: random_bert_batch(g, length=10), "classifier"),
    "gpt2": Kind(tiny_gpt2, lambda g: random_lm_batch(g, length=10), None),
    "llama": Kind(tiny_llama, lambda g: random_lm_batch(g, length=10), None),
    "vit": Kind(tiny_vit, lambda g: _pixel_batch(g, 1, 16, 3), "classifier"),
    "convnet": Kind(tiny_convnet, lambda g: _pixel_batch(g, 2, 8, 3, "x"), "fc", _convnet_loss),
}

#: Combinations a method cannot apply to, with the reason (everything else must work).
NOT_APPLICABLE: dict[tuple[str, str], str] = {
    **{
        ("composed", kind): "made by DRTModel.add_weighted_adapter from trained adapters (tests/test_adapters.py)"
        for kind in KINDS
    },
    ("fixed_classifier", "gpt2"): "a causal LM has no classification head to fix (its lm_head is tied)",
    ("fixed_classifier", "llama"): "a causal LM has no classification head to fix (its lm_head is tied)",
    ("dct_sparse", "convnet"): "the DCT path is defined for Linear/Conv1D layers; this network is convolutions",
}

#: Narrower settings where a method supports only some module types of a model, with the reason.
OVERRIDES: dict[tuple[str, str], dict[str, Any]] = {
    # the DCT path is defined for Linear/Conv1D only: the ViT's linear layers, not its patch convolution
    ("dct_sparse", "vit"): {"target_modules": r".*(q_proj|v_proj|fc1|fc2)"},
    # Llama's linear layers have no biases, the CNN has no normalisation layers
    ("norm_bias", "llama"): {"train": "norm"},
    ("norm_bias", "convnet"): {"train": "bias"},
}

CASES = [
    pytest.param(method, kind, marks=[pytest.mark.skip(reason=NOT_APPLICABLE[method, kind])])
    if (method, kind) in NOT_APPLICABLE
    else pytest.param(method, kind)
    for method in available_methods()
    for kind in KINDS
]


def make_config(method: str, kind: str) -> DRTConfig:
    """The method's config with its defaults, ``SMALL`` where it has the field, and the head trained in full."""
    cls = config_class(method)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {name: value for name, value in SMALL.items() if name in names}
    if cls.sized_by_density:
        kwargs["density"] = 0.25
    head = KINDS[kind].head
    default_targets = next(f for f in dataclasses.fields(cls) if f.name == "target_modules")
    if head is not None:
        if default_targets.default == "all-linear":
            kwargs["modules_to_save"] = [head]
        elif kind == "convnet":  # methods that target the head by name: the CNN's head is called fc
            kwargs["target_modules"] = [head]
    if kind == "convnet" and default_targets.default == "all-linear":
        kwargs["target_modules"] = ["conv1", "depthwise", "conv2"]  # every Conv2d kind, grouped included
    if kind == "vit" and default_targets.default == "all-linear":
        kwargs["target_modules"] = r".*(projection|q_proj|v_proj|fc1|fc2)"  # the patch-embedding convolution too
    return cls(**{**kwargs, **OVERRIDES.get((method, kind), {})})


def build(method: str, kind: str, seed: int = 0) -> tuple[DRTModel, nn.Module]:
    """The DRT model and an untouched copy of its base, scored on one calibration batch where needed."""
    spec = KINDS[kind]
    base = spec.build()
    original = copy.deepcopy(base)
    calibration = [spec.batch(torch.Generator().manual_seed(99))]
    model = get_drt_model(base, make_config(method, kind), calibration_data=calibration, loss_fn=spec.loss_fn)
    return model, original


@pytest.mark.parametrize(("method", "kind"), CASES)
def test_train_save_load_merge_unload(method: str, kind: str, tmp_path) -> None:
    spec = KINDS[kind]
    model, original = build(method, kind)
    inputs = spec.inputs(spec.batch(torch.Generator().manual_seed(5)))
    before = outputs(original, inputs)
    g = torch.Generator().manual_seed(1)  # the batches are drawn step by step, between the steps
    losses, _ = train_updating_masks(model, (spec.batch(g) for _ in range(STEPS)), loss_fn=spec.loss_fn)
    assert all(np.isfinite(losses)), losses
    assert torch.isfinite(outputs(model, inputs)).all()

    loaded = assert_save_load_roundtrip(model, copy.deepcopy(original), inputs, tmp_path)
    assert_merge_matches(loaded, inputs, rtol=1e-5, atol=1e-5)

    base = model.unload()
    assert not any(type(m).__module__.startswith("drt_peft") for m in base.modules())
    expected = original.state_dict()
    for key, value in base.state_dict().items():
        if model.drt_config.base_init == "seeded" and key.endswith("weight") and not torch.equal(value, expected[key]):
            continue  # a seeded Θ(0) replaces the pretrained targeted weights by design
        assert torch.equal(value, expected[key]), f"unload changed {key}"
    assert [p.requires_grad for p in base.parameters()] == [p.requires_grad for p in original.parameters()]
    if model.drt_config.base_init != "seeded":
        assert torch.equal(outputs(base, inputs), before), "unload changed the outputs"


@pytest.mark.parametrize(("method", "kind"), CASES)
def test_disable_adapter_runs_the_base_and_gives_the_adapter_back(method: str, kind: str) -> None:
    spec = KINDS[kind]
    model, original = build(method, kind)
    inputs = spec.inputs(spec.batch(torch.Generator().manual_seed(5)))
    g = torch.Generator().manual_seed(1)
    train_updating_masks(model, (spec.batch(g) for _ in range(3)), loss_fn=spec.loss_fn)
    trained, state = outputs(model, inputs), {k: v.clone() for k, v in model.training_state_dict().items()}
    parameters = list(model.parameters())
    base = outputs(copy.deepcopy(model).unload(), inputs)
    if model.drt_config.base_init != "seeded":
        assert torch.equal(base, outputs(original, inputs))
    with model.disable_adapter():
        assert torch.equal(outputs(model, inputs), base), "disable_adapter does not compute as the base"
        assert not list(model.drt_layers())
    assert torch.equal(outputs(model, inputs), trained), "the adapter did not come back exactly"
    assert all(a is b for a, b in zip(parameters, model.parameters(), strict=True))
    after = model.training_state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    losses, _ = train_updating_masks(model, (spec.batch(g) for _ in range(2)), loss_fn=spec.loss_fn)
    assert all(np.isfinite(losses))


@pytest.mark.parametrize(("method", "kind"), CASES)
def test_bf16_autocast_step(method: str, kind: str) -> None:
    spec = KINDS[kind]
    model, _ = build(method, kind)
    model.train()
    batch = spec.batch(torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = spec.loss(model, batch)
    loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad and p.numel()]  # a layer may train no entry
    assert trained and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)
    assert all(p.grad.dtype == p.dtype for p in trained)


def _accuracy(prediction: Any) -> dict[str, float]:
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


def _trainer(method: str, output_dir: str) -> DRTTrainer:
    model, _ = build(method, "bert")
    args = cpu_training_args(
        output_dir, per_device_train_batch_size=8, per_device_eval_batch_size=16, max_steps=STEPS,
        learning_rate=1e-2, save_strategy="steps", save_steps=3, eval_strategy="steps", eval_steps=3,
    )  # fmt: skip
    return DRTTrainer(
        model=model, args=args, train_dataset=Parity(48), eval_dataset=Parity(16), compute_metrics=_accuracy
    )


def _training_state(trainer: DRTTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.training_state_dict().items()}


@pytest.mark.parametrize("method", [m for m in available_methods() if (m, "bert") not in NOT_APPLICABLE])
def test_trainer_evaluates_checkpoints_and_resumes(method: str, tmp_path) -> None:
    straight = _trainer(method, str(tmp_path / "a"))
    straight.train()
    metrics = straight.evaluate()
    assert np.isfinite(metrics["eval_loss"]) and 0 <= metrics["eval_accuracy"] <= 1
    expected = _training_state(straight)

    checkpoint = tmp_path / "a" / "checkpoint-3"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    reloaded = DRTModel.from_pretrained(tiny_bert(), checkpoint)
    assert reloaded.drt_config.method_name == method

    again = _trainer(method, str(tmp_path / "b"))
    again.train(resume_from_checkpoint=str(checkpoint))
    got = _training_state(again)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), f"{method}: {key} differs after resuming"
