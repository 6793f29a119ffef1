"""Training through the Hugging Face Trainer (its default fused AdamW included) and accelerate."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from conftest import Parity, adamw, assert_loads_identically, cpu_training_args, tiny_bert, tiny_gpt2
from safetensors.torch import load_file
from transformers import Trainer

from drt_peft import DRTCallback, DRTTrainer, RandomConfig, get_drt_model


def test_trainer_trains_only_the_embedded_entries(tmp_path) -> None:
    base = tiny_bert()
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_drt_model(base, RandomConfig(density=0.2, modules_to_save=["classifier"]))
    args = cpu_training_args(
        tmp_path, per_device_train_batch_size=16, num_train_epochs=4, learning_rate=5e-3, logging_steps=1
    )
    trainer = Trainer(model=model, args=args, train_dataset=Parity(64))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0]
    state = trainer.optimizer.state
    d_total = 0
    for name, layer in model.drt_layers():
        d_total += layer.num_trainable
        assert state[layer.drt_values]["exp_avg"].numel() == layer.num_trainable
        weight = layer.effective_weight()
        moved = weight != before[f"{name}.weight"]
        assert not (moved & ~layer.get_mask()).any(), name
        assert moved.any(), name
    optimized = sum(p.numel() for group in trainer.optimizer.param_groups for p in group["params"])
    assert optimized == d_total + sum(p.numel() for p in model.get_base_model().classifier.parameters())


def test_accelerate_prepared_loop_trains_the_values() -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = get_drt_model(tiny_bert(), RandomConfig(density=0.2, modules_to_save=["classifier"]))
    optimizer = adamw(model, lr=1e-2)
    loader = torch.utils.data.DataLoader(Parity(32), batch_size=8)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    before = {name: layer.drt_values.detach().clone() for name, layer in model.drt_layers()}
    for batch in loader:
        accelerator.backward(model(**batch).loss)
        optimizer.step()
        optimizer.zero_grad()
    for name, layer in accelerator.unwrap_model(model).drt_layers():
        assert not torch.equal(layer.drt_values, before[name]), name


def _accuracy(prediction) -> dict[str, float]:
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


@pytest.mark.parametrize("trainer_class", [Trainer, DRTTrainer])
def test_evaluate_reports_loss_and_metrics_as_on_the_plain_model(trainer_class, tmp_path) -> None:
    model = get_drt_model(tiny_bert(), RandomConfig(density=0.2, modules_to_save=["classifier"]))
    args = cpu_training_args(tmp_path, max_steps=4, per_device_train_batch_size=8, per_device_eval_batch_size=8)
    trainer = trainer_class(
        model=model, args=args, train_dataset=Parity(32), eval_dataset=Parity(24), compute_metrics=_accuracy
    )
    trainer.train()
    ours = trainer.evaluate()
    plain = copy.deepcopy(model).merge_and_unload()
    reference = Trainer(model=plain, args=args, eval_dataset=Parity(24), compute_metrics=_accuracy).evaluate()
    assert ours["eval_loss"] == pytest.approx(reference["eval_loss"], rel=1e-5)
    assert ours["eval_accuracy"] == reference["eval_accuracy"]


class _Tokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 64, (10,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("trainer_class", [Trainer, DRTTrainer])
def test_tied_embeddings_checkpoint_and_reload(trainer_class, tmp_path) -> None:
    model = get_drt_model(tiny_gpt2(), RandomConfig(density=0.2))  # lm_head is tied to the token embeddings
    args = cpu_training_args(tmp_path, max_steps=2, per_device_train_batch_size=4, save_strategy="steps", save_steps=1)
    trainer_class(model=model, args=args, train_dataset=_Tokens(), callbacks=[DRTCallback()]).train()
    ids = torch.arange(10).unsqueeze(0)
    assert_loads_identically(model.eval(), tiny_gpt2(), tmp_path / "checkpoint-2", {"input_ids": ids})
    state = model.state_dict()  # each shared tensor once (safetensors refuses aliases), and it loads back strictly
    assert "base_model.lm_head.weight" not in state and "base_model.transformer.wte.weight" in state
    model.load_state_dict(state)


def test_drt_trainer_checkpoints_hold_the_adapter_not_the_base(tmp_path) -> None:
    model = get_drt_model(tiny_bert(), RandomConfig(density=0.2, modules_to_save=["classifier"]))
    args = cpu_training_args(tmp_path, max_steps=2, per_device_train_batch_size=8, save_strategy="steps", save_steps=2)
    trainer = DRTTrainer(model=model, args=args, train_dataset=Parity(16))
    trainer.train()
    trainer.save_model(tmp_path / "final")
    for folder in (tmp_path / "checkpoint-2", tmp_path / "final"):
        files = set(os.listdir(folder))
        assert {"adapter_model.safetensors", "adapter_config.json", "drt_training_state.safetensors"} <= files
        assert not files & {"model.safetensors", "pytorch_model.bin"}
        keys = load_file(folder / "drt_training_state.safetensors").keys()
        leaves = {key.rpartition(".")[2] for key in keys if ".classifier." not in key}
        assert leaves == {"drt_indices", "drt_values", "drt_base_values"}, leaves
