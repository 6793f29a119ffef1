"""Resuming a Trainer run from a checkpoint continues bit-identically (masks, values, optimizer, schedule)."""

from __future__ import annotations

import pytest
import torch
from conftest import Parity, cpu_training_args, tiny_bert
from transformers import Trainer

from drt_peft import DRTCallback, FreezeNetConfig, RigLConfig, SETConfig, get_drt_model

CONFIGS = {
    "set": lambda: SETConfig(density=0.2, update_frequency=2, drop_fraction=0.3),
    "rigl": lambda: RigLConfig(density=0.2, update_frequency=2, drop_fraction=0.3, t_end=8),
    "freezenet": lambda: FreezeNetConfig(density=0.2, frozen_weight_decay=0.1, num_batches=1),
}


def _trainer(method: str, output_dir: str, max_steps: int) -> Trainer:
    calibration = [
        {
            "input_ids": torch.randint(8, 64, (4, 12), generator=torch.Generator().manual_seed(0)),
            "labels": torch.tensor([0, 1, 0, 1]),
        }
    ]
    model = get_drt_model(tiny_bert(), CONFIGS[method](), calibration_data=calibration)
    args = cpu_training_args(
        output_dir, per_device_train_batch_size=8, max_steps=max_steps, learning_rate=1e-2,
        save_strategy="steps", save_steps=3,
    )  # fmt: skip
    return Trainer(model=model, args=args, train_dataset=Parity(64), callbacks=[DRTCallback()])


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items() if "drt_" in k or "extra" in k}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_resume_equals_uninterrupted(method: str, tmp_path) -> None:
    straight = _trainer(method, str(tmp_path / "a"), max_steps=8)
    straight.train()
    expected = _state(straight)

    resumed = _trainer(method, str(tmp_path / "b"), max_steps=8)
    resumed.train()  # writes checkpoint-3 (and -6) on the way
    again = _trainer(method, str(tmp_path / "c"), max_steps=8)
    again.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    got = _state(again)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
