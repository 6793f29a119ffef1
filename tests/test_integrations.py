"""Training through the Hugging Face Trainer (its default fused AdamW included) and accelerate."""

from __future__ import annotations

import torch
from conftest import Parity, cpu_training_args, tiny_bert
from transformers import Trainer

from drt_peft import RandomConfig, get_drt_model


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
    assert optimized == d_total + sum(p.numel() for p in model.base_model.classifier.parameters())


def test_accelerate_prepared_loop_trains_the_values() -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = get_drt_model(tiny_bert(), RandomConfig(density=0.2, modules_to_save=["classifier"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loader = torch.utils.data.DataLoader(Parity(32), batch_size=8)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    before = {name: layer.drt_values.detach().clone() for name, layer in model.drt_layers()}
    for batch in loader:
        accelerator.backward(model(**batch).loss)
        optimizer.step()
        optimizer.zero_grad()
    for name, layer in accelerator.unwrap_model(model).drt_layers():
        assert not torch.equal(layer.drt_values, before[name]), name
