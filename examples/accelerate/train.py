"""Train a DRT adapter on several GPUs with accelerate: DDP (every method here) or FSDP (static masks).

    bash scripts/setup.sh demo    # the pretrained MiniLM and Rotten Tomatoes (offline packages)
    accelerate launch --config_file examples/accelerate/ddp.yaml examples/accelerate/train.py --method rigl
    accelerate launch --config_file examples/accelerate/fsdp.yaml examples/accelerate/train.py --method magnitude

The configs start one process per GPU on one machine (set ``num_processes`` to the GPU count)
under bfloat16 autocast. Each process trains on its share of the batches: 1% of MiniLM's encoder
linear weights and a new classifier head learn Rotten Tomatoes sentiment; the held-out accuracy is
printed and the main process saves the adapter. ``--tiny`` takes a tiny BERT from a config and
synthetic data instead, to check a launch set-up in seconds, e.g. the DDP config as two CPU
processes on gloo (``ACCELERATE_USE_CPU``: accelerate's ``--cpu`` would start one process)::

    ACCELERATE_USE_CPU=true accelerate launch --config_file examples/accelerate/ddp.yaml --num_processes 2 \\
        --mixed_precision no examples/accelerate/train.py --tiny --steps 100 --density 0.05 --method rigl

Under DDP only the trained values and the head have gradients, so the all-reduce moves d numbers
per layer. ψ is a buffer that every process computes identically (seeded draws, all-reduced
gradients), so DDP is told not to broadcast buffers, which would otherwise send them, and a
pruned layer's dense buffer, at every forward. Under FSDP the frozen weights and the values are
sharded and the layers write ϑ into the gathered weights; masks that move (SET, RigL) are refused.
See docs/api.md, "Several GPUs".
"""

from __future__ import annotations

import argparse
import os

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs, DistributedType
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from drt_peft import DRTConfig, get_drt_model
from drt_peft.config import config_class
from drt_peft.trainer import unwrap_drt_model

#: The methods this example offers: two static masks and two that move ψ during training.
METHODS = ("random", "magnitude", "set", "rigl")
DYNAMIC = ("set", "rigl")


class Rows(Dataset):
    """Examples from a dict of equally long tensors."""

    def __init__(self, data: dict[str, Tensor]) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data["labels"])

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {key: value[i] for key, value in self.data.items()}


def _tiny(n: int, seed: int) -> dict[str, Tensor]:
    """Synthetic sequences whose label says whether token 7 occurs."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, 64, (n, 12), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    ids[labels == 1, 3] = 7
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _model_and_data(tiny: bool) -> tuple[nn.Module, dict[str, Tensor], dict[str, Tensor]]:
    """MiniLM with a new two-label head and Rotten Tomatoes (train, 2,000 held out); or the tiny stand-ins."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig

    if tiny:
        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
        )
        return AutoModelForSequenceClassification.from_config(config), _tiny(512, 0), _tiny(256, 1)
    from drt_peft.apps.offline import minilm_path, rotten_tomatoes, stratified_split
    from drt_peft.apps.recipes.text_classification import tokenize

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts, labels = rotten_tomatoes()
    train_idx, test_idx = stratified_split(labels, test_size=2000)
    train = tokenize(tokenizer, [texts[i] for i in train_idx], [labels[i] for i in train_idx], max_length=48)
    test = tokenize(tokenizer, [texts[i] for i in test_idx], [labels[i] for i in test_idx], max_length=48)
    torch.manual_seed(0)  # the new head: the same on every process
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2), train, test


def _config(method: str, density: float, steps: int) -> DRTConfig:
    """``method`` at ``density`` on all encoder linear layers, the head trained in full; dynamic masks move every
    tenth of the run until three quarters of it."""
    schedule = {"update_frequency": max(1, steps // 10), "t_end": 3 * steps // 4} if method in DYNAMIC else {}
    return config_class(method)(
        density=density, target_modules="all-linear", modules_to_save=["classifier"], **schedule
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", choices=METHODS, default="random")
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (each process: one batch per step)")
    parser.add_argument("--batch-size", type=int, default=16, help="per process")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--output-dir", default="outputs/example-accelerate")
    parser.add_argument("--tiny", action="store_true", help="a tiny BERT and synthetic data: checks a launch set-up")
    args = parser.parse_args()
    from transformers.utils import logging

    logging.set_verbosity_error()

    accelerator = Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    if accelerator.distributed_type == DistributedType.FSDP and args.method in DYNAMIC:
        raise SystemExit(
            f"--method {args.method} moves ψ during training, which FSDP does not support (it would rewrite "
            "sharded values); use the DDP config, or a static mask (random, magnitude) under FSDP"
        )
    with accelerator.main_process_first():  # the first process converts and caches what the others then read
        base, train, test = _model_and_data(args.tiny)
    model = get_drt_model(base, _config(args.method, args.density, args.steps))
    if accelerator.is_main_process:
        model.print_trainable_parameters()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    loader = DataLoader(
        Rows(train), batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    test_loader = DataLoader(Rows(test), batch_size=64)
    wrapped, optimizer, loader, test_loader = accelerator.prepare(model, optimizer, loader, test_loader)

    step = 0
    wrapped.train()
    while step < args.steps:
        for batch in loader:
            accelerator.backward(wrapped(**batch).loss)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            unwrap_drt_model(wrapped).update_masks(step, optimizer)  # a no-op for static masks
            if step == args.steps:
                break

    wrapped.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in test_loader:
            logits = wrapped(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            hits, labels = accelerator.gather_for_metrics((logits.argmax(-1) == batch["labels"], batch["labels"]))
            correct, total = correct + int(hits.sum()), total + len(labels)
    accelerator.print(
        f"{args.method}: held-out accuracy {correct / total:.2%} after {args.steps} steps on "
        f"{accelerator.num_processes} process(es) ({accelerator.distributed_type.value})"
    )
    state_dict = accelerator.get_state_dict(wrapped)  # under FSDP: gathered from the shards (every process calls)
    adapter_dir = os.path.join(args.output_dir, args.method)
    accelerator.unwrap_model(wrapped).save_pretrained(
        adapter_dir, state_dict=state_dict, is_main_process=accelerator.is_main_process
    )
    accelerator.print(f"adapter saved to {adapter_dir}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
