"""Sequence classification with a plain PyTorch loop: AdamW, linear warm-up and decay, accuracy."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm


def tokenize(tokenizer, texts: list[str], labels: list[int], max_length: int) -> dict[str, Tensor]:
    """Token ids, attention masks and labels, padded to ``max_length``."""
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
        "labels": torch.tensor(labels),
    }


def batches(data: dict[str, Tensor], batch_size: int, seed: int) -> Iterator[dict[str, Tensor]]:
    """Endless shuffled mini-batches; each epoch's order comes from ``seed`` and the epoch number."""
    n = len(data["labels"])
    epoch = 0
    while True:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for start in range(0, n - batch_size + 1, batch_size):
            chosen = order[start : start + batch_size]
            yield {key: value[chosen] for key, value in data.items()}
        epoch += 1


@dataclass
class TrainResult:
    """What a training run leaves: its optimizer, the loss and the wall time of every step."""

    optimizer: torch.optim.Optimizer
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)


def train(
    model: nn.Module,
    data: dict[str, Tensor],
    *,
    steps: int,
    lr: float,
    batch_size: int = 16,
    warmup: float = 0.1,
    weight_decay: float = 0.0,
    seed: int = 0,
    progress: bool = True,
) -> TrainResult:
    """Train the parameters that require grad for ``steps`` steps with AdamW.

    A :class:`~drt_peft.DRTModel` gets ``update_masks(step, optimizer)`` after every optimizer
    step, so dynamic methods (SET, RigL, ...) move their masks.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warm = max(1, round(warmup * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))
    )
    update_masks = getattr(model, "update_masks", None)
    result = TrainResult(optimizer)
    losses = result.losses
    model.train()
    bar = tqdm(total=steps, desc="training", disable=not progress, unit="step")
    for step, batch in zip(range(1, steps + 1), batches(data, batch_size, seed), strict=False):
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if update_masks is not None:
            update_masks(step, optimizer)
        result.step_seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        bar.update()
    bar.close()
    model.eval()
    return result


@torch.no_grad()
def accuracy(model: nn.Module, data: dict[str, Tensor], batch_size: int = 128) -> float:
    """Fraction of examples whose arg-max logit equals the label."""
    model.eval()
    correct = 0
    for start in range(0, len(data["labels"]), batch_size):
        logits = model(
            input_ids=data["input_ids"][start : start + batch_size],
            attention_mask=data["attention_mask"][start : start + batch_size],
        ).logits
        correct += int((logits.argmax(-1) == data["labels"][start : start + batch_size]).sum())
    return correct / len(data["labels"])


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of per-element optimizer state (tensors shaped like their parameter, e.g. Adam's moments)."""
    return sum(
        value.numel() * value.element_size()
        for param, state in optimizer.state.items()
        for value in state.values()
        if isinstance(value, Tensor) and value.shape == param.shape
    )
