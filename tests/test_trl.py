"""TRL's trainers on a DRTModel: SFTTrainer's fused LM head runs the backbone (``model.base_model``) and the head
apart; DPOTrainer scores its reference once, on the base through ``disable_adapter()``, with no second model."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from drt_peft import DRTCallback, DRTModel, RandomConfig, get_drt_model

trl = pytest.importorskip("trl", reason="TRL is the optional extra drt-peft[trl] (scripts/setup.sh installs it)")
Dataset = pytest.importorskip("datasets").Dataset

#: Short CPU runs: two optimizer steps, a learning rate at which every trained value moves, nothing written.
ARGS = {
    "use_cpu": True,
    "max_steps": 2,
    "learning_rate": 1e-2,
    "max_length": 16,
    "report_to": [],
    "save_strategy": "no",
    "logging_steps": 1,
    "disable_tqdm": True,
    "seed": 0,
}


def _tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny models' 64 ids, built offline: ``<pad>``, ``<eos>``, ``<unk>``, w0 … w60."""
    words = ["<pad>", "<eos>", "<unk>", *(f"w{i}" for i in range(61))]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _sentences(n: int, length: int, offset: int = 0) -> list[str]:
    return [" ".join(f"w{(7 * i + 3 * j + offset) % 61}" for j in range(length - i % 3)) for i in range(n)]


def _snapshot(model: DRTModel) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _assert_only_the_adapter_changed(model: DRTModel, before: dict[str, torch.Tensor], to_save: str = "") -> None:
    """Every layer's trained values moved, its weight off ψ did not; ``to_save`` trained; nothing else changed."""
    after = model.state_dict()
    adapter = set()
    for name, layer in model.drt_layers():
        values, weight = f"base_model.{name}.drt_values", f"base_model.{name}.base_layer.weight"
        assert not torch.equal(after[values], before[values]), f"{name}: the trained values did not move"
        off = ~layer.get_mask()
        assert torch.equal(after[weight][off], before[weight][off]), f"{name}: a weight off ψ changed"
        adapter |= {values, weight}
    if to_save:
        saved = {key for key in after if key.startswith(f"base_model.{to_save}.")}
        assert any(not torch.equal(after[key], before[key]) for key in saved), f"{to_save} did not train"
        adapter |= saved
    changed = sorted(key for key in after if key not in adapter and not torch.equal(after[key], before[key]))
    assert not changed, f"frozen tensors changed: {changed}"


@pytest.mark.parametrize(("build", "to_save"), [(tiny_llama, "model.norm"), (tiny_gpt2, "transformer.ln_f")])
def test_sft_trainer_trains_only_the_adapter(build, to_save: str, tmp_path) -> None:
    model = get_drt_model(build(), RandomConfig(density=0.2, modules_to_save=[to_save]))
    before = _snapshot(model)
    trainer = trl.SFTTrainer(
        model=model,
        args=trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, **ARGS),
        train_dataset=Dataset.from_dict({"text": _sentences(8, 10)}),
        processing_class=_tokenizer(),
        callbacks=[DRTCallback()],
    )
    assert math.isfinite(trainer.train().training_loss)
    _assert_only_the_adapter_changed(model, before, to_save)
    assert "drt/density" in trainer.state.log_history[0]


def test_dpo_trainer_scores_the_reference_on_the_base_without_a_second_model(tmp_path, monkeypatch) -> None:
    def second_model(*args, **kwargs):
        raise AssertionError("DPOTrainer loaded a second copy of the model as its reference")

    monkeypatch.setattr("trl.trainer.dpo_trainer.create_model_from_path", second_model)
    # Prune mode: the adapter starts away from the base, so a reference scored on the adapter would show.
    model = get_drt_model(tiny_llama(), RandomConfig(density=0.2, mode="prune"))
    preferences = Dataset.from_dict(
        {
            "prompt": _sentences(4, 4),
            "chosen": [f" {text}" for text in _sentences(4, 3, offset=20)],
            "rejected": [f" {text}" for text in _sentences(4, 3, offset=40)],
        }
    )
    args = trl.DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, precompute_ref_log_probs=True, **ARGS)
    with model.disable_adapter():
        trainer = trl.DPOTrainer(model=model, args=args, train_dataset=preferences, processing_class=_tokenizer())
    assert trainer.ref_model is None

    from trl.trainer.utils import add_fused_lm_head

    base = tiny_llama()  # the bare base, scored as TRL scores any model: through its fused LM head
    add_fused_lm_head(base)
    data = trainer.train_dataset
    for start in range(0, len(data), args.per_device_train_batch_size):
        rows = [data[i] for i in range(start, start + args.per_device_train_batch_size)]
        batch = trainer.data_collator(rows)
        reference = torch.tensor([[row[f"ref_{side}_logps"] for row in rows] for side in ("chosen", "rejected")])
        assert torch.equal(reference, torch.stack(trainer.compute_ref_log_probs(base, batch)))
        adapter = torch.stack(trainer.compute_ref_log_probs(model, batch))
        assert not torch.allclose(reference, adapter, rtol=1e-3, atol=1e-3), "the reference is the adapter's"

    before = _snapshot(model)
    assert math.isfinite(trainer.train().training_loss)
    _assert_only_the_adapter_changed(model, before)
