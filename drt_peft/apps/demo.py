"""``drt-peft demo``: fine-tune the real MiniLM on real Rotten Tomatoes snippets with a DRT method.

Trains ≤ 1% of the encoder's linear weights (plus the new classifier head) and prints held-out
accuracy before and after, the trainable parameter count, the optimizer state and the adapter
size on disk.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from ..config import DRTConfig, config_class
from ..model import DRTModel, get_drt_model
from .offline import MissingResourceError, minilm_path, rotten_tomatoes, stratified_split
from .recipes.text_classification import accuracy, optimizer_state_bytes, tokenize, train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default="random", choices=["random", "magnitude"], help="DRT method")
    parser.add_argument(
        "--density", type=float, default=0.01, help="fraction of the encoder's linear weights that train"
    )
    parser.add_argument(
        "--mode", default="freeze", choices=["freeze", "prune"], help="what the untrained entries become"
    )
    parser.add_argument("--steps", type=int, default=500, help="training steps")
    parser.add_argument("--lr", type=float, default=1e-2, help="peak learning rate (sparse adapters need a high one)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=48, help="tokens per snippet (99%% are shorter than 56)")
    parser.add_argument("--test-size", type=int, default=2000, help="held-out snippets (stratified, fixed split)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="outputs/demo-adapter", help="where the adapter is saved")


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _config(args: argparse.Namespace) -> DRTConfig:
    """The method config from the arguments; raises ``ValueError`` for any value out of range."""
    for name in ("steps", "batch_size", "max_length", "test_size"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')}={value} must be a positive integer")
    if not args.lr > 0:
        raise ValueError(f"--lr={args.lr} must be > 0")
    return config_class(args.method)(
        density=args.density,
        mode=args.mode,
        target_modules="all-linear",
        modules_to_save=["classifier"],
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> int:
    try:  # the arguments first: nothing is loaded for a run that cannot start
        config = _config(args)
    except ValueError as err:
        print(f"error: {err}")
        return 2
    try:
        path = minilm_path()
        texts, labels = rotten_tomatoes()
    except MissingResourceError as err:
        print(f"error: {err}")
        return 1
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(path)
    train_idx, test_idx = stratified_split(labels, args.test_size, seed=0)
    train_data = tokenize(tokenizer, [texts[i] for i in train_idx], [labels[i] for i in train_idx], args.max_length)
    test_data = tokenize(tokenizer, [texts[i] for i in test_idx], [labels[i] for i in test_idx], args.max_length)
    majority = max(sum(test_data["labels"].tolist()), len(test_idx) - sum(test_data["labels"].tolist())) / len(test_idx)
    print(
        f"Rotten Tomatoes: {len(train_idx)} train / {len(test_idx)} held-out snippets (majority class {majority:.1%})"
    )

    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = get_drt_model(base, config)
    d = sum(layer.num_trainable for _, layer in model.drt_layers())
    total = sum(layer.base_layer.weight.numel() for _, layer in model.drt_layers())
    print(
        f"MiniLM-L6 ({path})\n{args.method} DRT, mode={args.mode}: d = {d:,} of D = {total:,} "
        f"linear weights of the encoder and pooler ({d / total:.3%}) + classifier head"
    )
    model.print_trainable_parameters()

    before = accuracy(model, test_data)
    print(f"held-out accuracy before training: {before:.2%}")
    start = time.perf_counter()
    run = train(model, train_data, steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    seconds = time.perf_counter() - start
    after = accuracy(model, test_data)

    model.save_pretrained(args.output_dir)
    adapter = os.path.getsize(os.path.join(args.output_dir, "adapter_model.safetensors"))
    reloaded = DRTModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(path, num_labels=2), args.output_dir
    )
    reloaded_acc = accuracy(reloaded, test_data)
    head = sum(p.numel() for p in model.get_base_model().classifier.parameters())
    print(
        f"\nheld-out accuracy: {before:.2%} -> {after:.2%} after {args.steps} steps ({seconds:.0f} s, "
        f"{seconds / args.steps:.2f} s/step); reloaded adapter: {reloaded_acc:.2%}\n"
        f"trainable parameters: {d + head:,} ({d:,} DRT values + {head:,} head)\n"
        f"optimizer state: {_mib(optimizer_state_bytes(run.optimizer))} (AdamW moments; full fine-tuning: "
        f"{_mib(8 * model.get_nb_trainable_parameters()[1])})\n"
        f"adapter on disk: {_mib(adapter)} in {args.output_dir}"
    )
    return 0
