"""Calibration batches for data-driven criteria: iteration, losses and lean gradient passes.

Scores are computed in eval mode (dropout off) so the same data gives the same mask on every
process, with gradients taken for the targeted weights only (every other parameter is
temporarily frozen), one backward at a time, accumulated in place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .scoring import LossFn, ScoringContext


def target_density(scoring: ScoringContext) -> float:
    """The config's density, or ``num_trainable`` over the targets' size."""
    config = scoring.config
    if config.density is not None:
        return config.density
    return config.num_trainable / sum(t.weight.numel() for t in scoring.targets)


def calibration_batches(scoring: ScoringContext, limit: int | None = None) -> Iterator[Any]:
    """Up to ``limit`` batches of ``calibration_data``; raises if there is none."""
    name = scoring.config.method_name
    if scoring.calibration_data is None:
        raise ValueError(
            f"method {name!r} scores weights on data: pass calibration_data=... to get_drt_model, an iterable "
            "of batches (dicts of model inputs with labels for transformers models, or any batch with loss_fn=...)"
        )
    count = 0
    for batch in scoring.calibration_data:
        if limit is not None and count >= limit:
            break
        yield batch
        count += 1
    if count == 0:
        raise ValueError(f"calibration_data for method {name!r} is empty; pass at least one batch")


def batch_loss(model: nn.Module, batch: Any, loss_fn: LossFn | None) -> Tensor:
    """``loss_fn(model, batch)``, or the ``.loss`` of ``model(**batch)`` for dict batches."""
    if loss_fn is not None:
        return loss_fn(model, batch)
    if not isinstance(batch, Mapping):
        raise ValueError(
            f"calibration batches are {type(batch).__name__}, not dicts of model inputs; pass dicts for "
            "model(**batch) with labels, or loss_fn=lambda model, batch: ... to get_drt_model"
        )
    output = model(**batch)
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if loss is None:
        raise ValueError(
            "the model output has no loss: add labels to the calibration batches, "
            "or pass loss_fn=lambda model, batch: ... to get_drt_model"
        )
    return loss


def split_samples(batch: Any) -> Iterator[Any]:
    """The single examples of a batch (dict or tuple/list of tensors sharing dim 0)."""
    if isinstance(batch, Mapping):
        size = len(next(v for v in batch.values() if isinstance(v, Tensor)))
        for i in range(size):
            yield {k: v[i : i + 1] if isinstance(v, Tensor) else v for k, v in batch.items()}
    elif isinstance(batch, Sequence) and not isinstance(batch, str):
        size = len(next(v for v in batch if isinstance(v, Tensor)))
        for i in range(size):
            yield type(batch)(v[i : i + 1] if isinstance(v, Tensor) else v for v in batch)
    else:
        raise ValueError(f"cannot split a {type(batch).__name__} batch into samples; use dicts or tuples of tensors")


@contextlib.contextmanager
def scoring_mode(model: nn.Module, weights: Sequence[Tensor]) -> Iterator[None]:
    """Eval mode, gradients enabled for ``weights`` only; everything restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Switch a transformers model to eager attention (fused CPU attention has no double backward)."""
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    switch = hasattr(model, "set_attn_implementation") and previous not in (None, "eager")
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(previous)


def mean_gradients(scoring: ScoringContext, weights: Sequence[Tensor], limit: int | None) -> list[Tensor]:
    """Mean over calibration batches of ∂L/∂w for each of ``weights`` (one backward per batch)."""
    sums = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    count = 0
    for batch in calibration_batches(scoring, limit):
        grads = torch.autograd.grad(batch_loss(scoring.model, batch, scoring.loss_fn), weights, allow_unused=True)
        for total, grad in zip(sums, grads, strict=True):
            if grad is not None:
                total.add_(grad)
        count += 1
    return [s / count for s in sums]
