"""FISH mask (Sung et al. 2021): the Fisher information s = mean over N samples of (∂ log p(y|x)/∂θ)².

Sung et al. define the Fisher with y drawn from the model, E_{y~p_θ(y|x)} (∂ log p_θ(y|x)/∂θ)², and,
as its code does by default (``sample_type="label"`` of ``calculate_the_importance_label`` in
github.com/varunnair18/FISH, the setting of its GLUE scripts), estimate it with the *empirical*
Fisher, y the true label; its code's other ``sample_type``, ``"expect"``
(``calculate_the_importance_expect``), sums Σ_y p_θ(y|x)·(∂ log p_θ(y|x)/∂θ)² over all labels. The two
differ (Kunstner, Balles & Hennig, *Limitations of the Empirical Fisher Approximation*, NeurIPS
2019), most of all before the model fits the task, as with a new head. ``fisher_labels`` chooses:
``"true"`` (empirical), ``"expected"`` (the code's ``expect``, one backward per label), ``"sampled"``
(y ~ p_θ(y|x), drawn from the seed: the one-backward Monte Carlo estimate of the same Fisher, for
outputs with many labels or one per token) and ``"predicted"`` (y the arg-max of p_θ(y|x)).

One backward per sample (per label with ``"expected"``); only the running sum of squares of the
targeted weights' gradients is kept. Before training the gradients are taken for the plain targeted
weights; during training (re-scoring every ``update_frequency`` steps) the DRT layers form the dense
weight gradient in their backward instead, since their base weights carry no gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ...criterion import criterion
from ...layer import DRTLayer
from ...logging import progress_bar
from ...seeding import generator
from ..calibration import batch_loss, calibration_batches, require_reiterable, scoring_mode, split_samples
from ..dynamic import capture_dense_gradients
from ..scoring import ScoringContext

#: ``gradients(loss, retain_graph)``: the gradients the Fisher squares, one per target (None where unused).
Gradients = Callable[[Tensor, bool], Sequence[Tensor | None]]


def _log_likelihood_terms(scoring: ScoringContext, sample: object, index: int) -> list[tuple[float, Tensor]]:
    """``(weight, -log p(y|x))`` pairs whose weighted squared gradients add up to the sample's Fisher: one pair
    with weight 1 for a single y (the true label, a draw from p(y|x) seeded by the sample's ``index``, or the
    arg-max), or one pair per label y with weight p(y|x) for ``fisher_labels="expected"``."""
    labels = scoring.config.fisher_labels
    if labels == "true":
        return [(1.0, batch_loss(scoring.model, sample, scoring.loss_fn))]
    if not isinstance(sample, dict):
        raise ValueError(f"fisher_labels={labels!r} needs dict batches passed as model(**batch)")
    inputs = {k: v for k, v in sample.items() if k != "labels"}
    logits = getattr(scoring.model(**inputs), "logits", None)
    if logits is None:
        raise ValueError(f"fisher_labels={labels!r} needs a model output with .logits")
    log_probs = torch.log_softmax(logits.float(), dim=-1).reshape(-1, logits.shape[-1])
    if labels == "predicted":
        return [(1.0, -log_probs.max(dim=-1).values.sum())]
    probs = log_probs.detach().exp()
    if labels == "sampled":
        draw = generator(scoring.config.seed, "fisher labels", str(index))
        y = torch.multinomial(probs.cpu().double(), 1, generator=draw).to(log_probs.device)
        return [(1.0, -log_probs.gather(1, y).sum())]
    if log_probs.shape[0] != 1:
        raise ValueError(
            f"fisher_labels='expected' needs one prediction per sample (logits of shape [1, labels]), got logits of "
            f"shape {tuple(logits.shape)}; use fisher_labels='sampled' for outputs with one prediction per token"
        )
    return [(float(p), -log_probs[0, y]) for y, p in enumerate(probs[0].tolist())]


def fisher_diagonal(scoring: ScoringContext, gradients: Gradients, progress: bool = False) -> list[Tensor]:
    """Mean over ``num_samples`` samples of the squared per-sample gradients that ``gradients`` returns, each
    sample's terms weighted as :func:`_log_likelihood_terms` says (with a progress bar over the samples if
    ``progress``)."""
    sums = [torch.zeros_like(t.weight, dtype=torch.float32) for t in scoring.targets]
    count, limit = 0, scoring.config.num_samples
    desc = f"{scoring.config.method_name} scoring"
    with progress_bar(desc=desc, total=limit, unit="sample", enabled=progress) as bar:
        for batch in calibration_batches(scoring, scoring.config.num_batches):
            for sample in split_samples(batch):
                terms = _log_likelihood_terms(scoring, sample, count)
                for i, (weight, loss) in enumerate(terms):
                    for total, grad in zip(sums, gradients(loss, i < len(terms) - 1), strict=True):
                        if grad is not None:
                            total.addcmul_(grad, grad, value=weight)
                count += 1
                bar.update()
                if count == limit:
                    return [s / count for s in sums]
    return [s / count for s in sums]


@criterion("fisher")
def fisher_scores(scoring: ScoringContext) -> list[Tensor]:
    """The Fisher of the plain targeted weights (before the layers are embedded)."""
    every = scoring.config.update_frequency
    if every:
        require_reiterable(scoring, f"again every update_frequency={every} steps")
    weights = [t.weight for t in scoring.targets]
    with scoring_mode(scoring.model, weights):
        return fisher_diagonal(
            scoring,
            lambda loss, retain: torch.autograd.grad(loss, weights, allow_unused=True, retain_graph=retain),
            True,
        )


def live_fisher_scores(scoring: ScoringContext, layers: Sequence[DRTLayer]) -> list[Tensor]:
    """The Fisher of embedded layers, from the dense gradients they capture in their backward.

    Runs in eval mode and leaves every ``.grad`` untouched (``torch.autograd.grad``).
    """
    values = [layer.drt_values for layer in layers]

    def dense_gradients(loss: Tensor, retain: bool) -> list[Tensor | None]:
        torch.autograd.grad(loss, values, allow_unused=True, retain_graph=retain)
        grads = [layer.dense_grad for layer in layers]
        for layer in layers:
            layer.dense_grad = None
        return grads

    was_training = scoring.model.training
    scoring.model.eval()
    capture_dense_gradients(layers, True)
    try:
        with torch.enable_grad():
            return fisher_diagonal(scoring, dense_gradients)
    finally:
        capture_dense_gradients(layers, False)
        scoring.model.train(was_training)
