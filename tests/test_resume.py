"""Resuming a Trainer run from a checkpoint continues bit-identically (masks, values, optimizer, schedule),
with the plain ``Trainer`` + ``DRTCallback`` (full state-dict checkpoints) and with ``DRTTrainer``
(compact checkpoints), also when evaluation runs between the checkpoints."""

from __future__ import annotations

import pytest
import torch
from conftest import Parity, cpu_training_args, tiny_bert
from transformers import Trainer

from drt_peft import (
    DeepRConfig,
    DRTCallback,
    DRTModel,
    DRTTrainer,
    FreezeNetConfig,
    RigLConfig,
    SETConfig,
    SpIELConfig,
    get_drt_model,
)

CONFIGS = {
    "set": lambda: SETConfig(density=0.2, update_frequency=2, drop_fraction=0.3),
    "set-prune": lambda: SETConfig(density=0.02, update_frequency=2, drop_fraction=0.3, mode="prune"),
    "set-prune-dense": lambda: SETConfig(density=0.2, update_frequency=2, drop_fraction=0.3, mode="prune"),
    "rigl": lambda: RigLConfig(density=0.2, update_frequency=2, drop_fraction=0.3, t_end=8),
    # checkpoint-3 falls inside the window (steps 3, 4) whose gradients the update at step 4 sums
    "spiel": lambda: SpIELConfig(density=0.2, update_frequency=4, accumulation_steps=2, t_end=8),
    "freezenet": lambda: FreezeNetConfig(density=0.2, frozen_weight_decay=0.1, num_batches=1),
    # sparse kernels, and noise and shrinkage on every step between the updates
    "deep_r-prune": lambda: DeepRConfig(density=0.02, update_frequency=2, temperature=1e-5, l1=1e-3, mode="prune"),
}
TRAINERS = {"Trainer": Trainer, "DRTTrainer": DRTTrainer}


def _trainer(method: str, trainer: str, output_dir: str, max_steps: int) -> Trainer:
    calibration = [
        {
            "input_ids": torch.randint(8, 64, (4, 12), generator=torch.Generator().manual_seed(0)),
            "labels": torch.tensor([0, 1, 0, 1]),
        }
    ]
    model = get_drt_model(tiny_bert(), CONFIGS[method](), calibration_data=calibration)
    args = cpu_training_args(
        output_dir, per_device_train_batch_size=8, max_steps=max_steps, learning_rate=1e-2,
        save_strategy="steps", save_steps=3, eval_strategy="steps", eval_steps=2,
    )  # fmt: skip
    return TRAINERS[trainer](
        model=model, args=args, train_dataset=Parity(64), eval_dataset=Parity(16), callbacks=[DRTCallback()]
    )


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items() if "drt_" in k or "extra" in k}


@pytest.mark.parametrize("trainer", sorted(TRAINERS))
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_resume_equals_uninterrupted(method: str, trainer: str, tmp_path) -> None:
    straight = _trainer(method, trainer, str(tmp_path / "a"), max_steps=8)
    straight.train()  # writes checkpoint-3 (and -6) on the way, evaluating at steps 2, 4, 6, 8
    expected = _state(straight)
    probe = torch.stack([Parity(8)[i]["input_ids"] for i in range(8)])
    with torch.no_grad():
        logits = straight.model.eval()(input_ids=probe).logits

    again = _trainer(method, trainer, str(tmp_path / "b"), max_steps=8)
    again.evaluate()  # outputs computed with the initial mask before the checkpoint's mask is loaded
    again.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    got = _state(again)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    with torch.no_grad():
        assert torch.equal(again.model.eval()(input_ids=probe).logits, logits)

    # every checkpoint holds the compact adapter, which loads on a fresh base
    reloaded = DRTModel.from_pretrained(tiny_bert(), tmp_path / "a" / "checkpoint-6")
    assert reloaded.drt_config.method_name == CONFIGS[method]().method_name
