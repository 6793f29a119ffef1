"""Gradient-based criteria on calibration data (survey §5; docs/methods/).

g is the mean gradient of the loss over the calibration batches, taken for the targeted weights
only (the other weights are held fixed), in eval mode.

- SNIP (Lee et al. 2019, eq. 16): s = |g ⊙ θ|.
- GraSP (Wang et al. 2020): the paper removes the weights with the largest −θ ⊙ (H g); here the
  kept score is s = θ ⊙ (H g), so keeping the largest s keeps the lowest −θ ⊙ (H g) exactly as the
  paper does. H g is a Hessian-vector product by double backprop. As the reference code does, g and
  H g are those of the loss of the logits divided by the config's ``temperature`` T (200).
- GraSP-abs (Lubana & Dick 2021): s = |θ ⊙ (H g)|.
- Lubana & Dick (2021): s = |g| · θ².
- FORCE (de Jorge et al. 2021): k rounds at densities density^(r/k) (or linearly spaced; N:M
  structures start from N/M instead of 1); round r
  scores s = |θ ⊙ g(θ ⊙ m)| with g taken on the network masked by the previous round's mask m,
  so pruned weights may return. The last round's scores select ψ.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...criterion import criterion
from ..calibration import (
    batch_loss,
    calibration_batches,
    check_tempered_loss_fn,
    eager_attention,
    mean_gradients,
    require_reiterable,
    scoring_mode,
)
from ..rounds import prune_in_rounds
from ..scoring import ScoringContext


def _weights(scoring: ScoringContext) -> list[Tensor]:
    return [t.weight for t in scoring.targets]


def _gradients(scoring: ScoringContext) -> list[Tensor]:
    weights = _weights(scoring)
    with scoring_mode(scoring.model, weights):
        return mean_gradients(scoring, weights, scoring.config.num_batches, f"{scoring.config.method_name} scoring")


@criterion("snip")
def snip_scores(scoring: ScoringContext) -> list[Tensor]:
    """s = |g ⊙ θ| (Lee et al. 2019)."""
    return [(g * w.detach()).abs() for g, w in zip(_gradients(scoring), _weights(scoring), strict=True)]


@criterion("lubana_dick")
def lubana_dick_scores(scoring: ScoringContext) -> list[Tensor]:
    """s = |g| · θ² (Lubana & Dick 2021)."""
    return [g.abs() * w.detach().float() ** 2 for g, w in zip(_gradients(scoring), _weights(scoring), strict=True)]


def hessian_gradient_products(scoring: ScoringContext) -> list[Tensor]:
    """H g over the targeted weights: g from a first pass, then ∇(∇L · g) per batch, averaged.

    L is the loss of the logits divided by the config's ``temperature`` T (Wang et al. 2020's code uses
    T = 200): the model's loss recomputed from ``logits / T``, or ``loss_fn(model, batch, temperature=T)``.
    """
    require_reiterable(scoring, "twice (for g, then for H g)")
    temperature = scoring.config.temperature
    check_tempered_loss_fn(scoring, temperature)
    weights = _weights(scoring)
    limit = scoring.config.num_batches
    name = scoring.config.method_name
    with scoring_mode(scoring.model, weights), eager_attention(scoring.model):
        g = mean_gradients(scoring, weights, limit, f"{name} scoring: g", temperature)
        sums = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
        count = 0
        for batch in calibration_batches(scoring, limit, f"{name} scoring: H g"):
            loss = batch_loss(scoring.model, batch, scoring.loss_fn, temperature)
            grads = torch.autograd.grad(loss, weights, create_graph=True)
            dot = sum((gi * g0.to(gi.dtype)).sum() for gi, g0 in zip(grads, g, strict=True))
            for total, hg in zip(sums, torch.autograd.grad(dot, weights), strict=True):
                total.add_(hg)
            count += 1
    return [s / count for s in sums]


@criterion("grasp")
def grasp_scores(scoring: ScoringContext) -> list[Tensor]:
    """s = θ ⊙ (H g): keeping the largest keeps the lowest GraSP score −θ ⊙ (H g) (Wang et al. 2020)."""
    return [
        w.detach().float() * hg for w, hg in zip(_weights(scoring), hessian_gradient_products(scoring), strict=True)
    ]


@criterion("grasp_abs")
def grasp_abs_scores(scoring: ScoringContext) -> list[Tensor]:
    """s = |θ ⊙ (H g)| (Lubana & Dick 2021)."""
    return [
        (w.detach().float() * hg).abs()
        for w, hg in zip(_weights(scoring), hessian_gradient_products(scoring), strict=True)
    ]


@criterion("force")
def force_scores(scoring: ScoringContext) -> list[Tensor]:
    """Iterative SNIP / FORCE: |θ ⊙ g(θ ⊙ m)| re-scored on the masked network over ``rounds`` rounds."""
    if scoring.config.rounds > 1:
        require_reiterable(scoring, f"once per round (rounds={scoring.config.rounds})")
    weights = _weights(scoring)

    def score_round(originals: list[Tensor]) -> list[Tensor]:
        with scoring_mode(scoring.model, weights):
            grads = mean_gradients(scoring, weights, scoring.config.num_batches)
        return [(g * o).abs() for g, o in zip(grads, originals, strict=True)]

    return prune_in_rounds(scoring, score_round)
