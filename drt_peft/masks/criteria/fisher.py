"""FISH mask (Sung et al. 2021): the empirical Fisher s = mean over N samples of (∂ log p(y|x)/∂θ)².

One backward per sample; only the running sum of squares of the targeted weights' gradients is
kept. Before training the gradients are taken for the plain targeted weights; during training
(re-scoring every ``update_frequency`` steps) the DRT layers form the dense weight gradient in
their backward instead, since their base weights carry no gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ...criterion import criterion
from ...layer import DRTLayer
from ...logging import progress_bar
from ..calibration import batch_loss, calibration_batches, require_reiterable, scoring_mode, split_samples
from ..dynamic import capture_dense_gradients
from ..scoring import ScoringContext


def _negative_log_likelihood(scoring: ScoringContext, sample: object) -> Tensor:
    """-log p(y|x) of one sample, y the true label or (``fisher_labels="predicted"``) the model's arg-max."""
    if scoring.config.fisher_labels == "true":
        return batch_loss(scoring.model, sample, scoring.loss_fn)
    if not isinstance(sample, dict):
        raise ValueError("fisher_labels='predicted' needs dict batches passed as model(**batch)")
    inputs = {k: v for k, v in sample.items() if k != "labels"}
    logits = getattr(scoring.model(**inputs), "logits", None)
    if logits is None:
        raise ValueError("fisher_labels='predicted' needs a model output with .logits")
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -log_probs.max(dim=-1).values.sum()


def empirical_fisher(
    scoring: ScoringContext, gradients: Callable[[Tensor], Sequence[Tensor | None]], progress: bool = False
) -> list[Tensor]:
    """Mean over ``num_samples`` samples of the squared per-sample gradients that ``gradients(loss)`` returns
    (with a progress bar over the samples if ``progress``)."""
    sums = [torch.zeros_like(t.weight, dtype=torch.float32) for t in scoring.targets]
    count, limit = 0, scoring.config.num_samples
    desc = f"{scoring.config.method_name} scoring"
    with progress_bar(desc=desc, total=limit, unit="sample", enabled=progress) as bar:
        for batch in calibration_batches(scoring, scoring.config.num_batches):
            for sample in split_samples(batch):
                for total, grad in zip(sums, gradients(_negative_log_likelihood(scoring, sample)), strict=True):
                    if grad is not None:
                        total.addcmul_(grad, grad)
                count += 1
                bar.update()
                if count == limit:
                    return [s / count for s in sums]
    return [s / count for s in sums]


@criterion("fisher")
def fisher_scores(scoring: ScoringContext) -> list[Tensor]:
    """Empirical Fisher of the plain targeted weights (before the layers are embedded)."""
    every = scoring.config.update_frequency
    if every:
        require_reiterable(scoring, f"again every update_frequency={every} steps")
    weights = [t.weight for t in scoring.targets]
    with scoring_mode(scoring.model, weights):
        return empirical_fisher(scoring, lambda loss: torch.autograd.grad(loss, weights, allow_unused=True), True)


def live_fisher_scores(scoring: ScoringContext, layers: Sequence[DRTLayer]) -> list[Tensor]:
    """Empirical Fisher of embedded layers, from the dense gradients they capture in their backward.

    Runs in eval mode and leaves every ``.grad`` untouched (``torch.autograd.grad``).
    """
    values = [layer.drt_values for layer in layers]

    def dense_gradients(loss: Tensor) -> list[Tensor | None]:
        torch.autograd.grad(loss, values, allow_unused=True)
        grads = [layer.dense_grad for layer in layers]
        for layer in layers:
            layer.dense_grad = None
        return grads

    was_training = scoring.model.training
    scoring.model.eval()
    capture_dense_gradients(layers, True)
    try:
        with torch.enable_grad():
            return empirical_fisher(scoring, dense_gradients)
    finally:
        capture_dense_gradients(layers, False)
        scoring.model.train(was_training)
