"""SynFlow (Tanaka et al. 2020): data-free, iterative synaptic-flow scores.

The network is made positive-linear: every parameter is replaced by its absolute value and the
model runs in float64 on an all-ones input; R = 1ᵀ f(1) is the sum of its output, and the score
of a weight is s = (∂R/∂θ) ⊙ θ. Over ``rounds`` rounds (density^(r/k), exponential by default)
the lowest-scoring weights are masked to zero and the rest re-scored, so pruned weights stay
pruned.

For networks of linear and convolutional layers with ReLU this is the paper's construction, and
the scores obey its conservation law: the sum of scores entering a layer equals the sum leaving
it, and every layer's total equals R. Transformers have parts that are not positive-linear;
during scoring:

- normalisation layers (:func:`~drt_peft.targeting.is_normalisation`: layer, group, RMS, batch and
  instance norms and any module whose class name ends in ``Norm``) are replaced by the identity, as
  the paper does with batch norm;
- dropout is off (eval mode);
- attention keeps its softmax: with positive queries and keys it is a positive, row-normalised
  averaging, so flow still passes through values and output projections but the conservation
  law holds only approximately across attention blocks;
- token inputs are replaced by an all-ones ``inputs_embeds``; other float inputs by ones.

The all-ones input has the shape of the first calibration batch when one is given (only its
shapes are used), else ``[1, 8, hidden_size]`` embeddings for text models or a
``[1, num_channels, image_size, image_size]`` image for vision models.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ...criterion import criterion
from ...targeting import is_normalisation
from ..calibration import calibration_batches, scoring_mode
from ..rounds import prune_in_rounds
from ..scoring import ScoringContext


@contextlib.contextmanager
def positive_linear(model: nn.Module) -> Iterator[None]:
    """|θ| in float64 with norms replaced by identities; signs, dtypes and modules restored after."""
    swapped = []
    for name, module in list(model.named_modules()):
        if name and is_normalisation(module):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            swapped.append((parent, child, module))
            setattr(parent, child, nn.Identity())
    tensors = [p for p in model.parameters()] + [b for b in model.buffers() if b.is_floating_point()]
    dtypes = [t.dtype for t in tensors]
    signs = [torch.signbit(p) for p in model.parameters()]
    try:
        with torch.no_grad():
            for t in tensors:
                t.data = t.data.double()
            for p in model.parameters():
                p.abs_()
        yield
    finally:
        with torch.no_grad():
            for p, sign in zip(model.parameters(), signs, strict=True):
                p.copy_(torch.where(sign, -p.abs(), p.abs()))
            for t, dtype in zip(tensors, dtypes, strict=True):
                t.data = t.data.to(dtype)
        for parent, child, module in swapped:
            setattr(parent, child, module)


def _ones_input(scoring: ScoringContext) -> tuple[tuple, dict[str, Any]]:
    """Positional and keyword inputs of ones (see module docstring)."""
    model = scoring.model
    config = getattr(model, "config", None)
    if scoring.calibration_data is not None:
        batch = next(calibration_batches(scoring, 1))
        if isinstance(batch, Mapping):
            kwargs = {k: v for k, v in batch.items() if k != "labels" and isinstance(v, Tensor)}
            if "input_ids" in kwargs:
                ids = kwargs.pop("input_ids")
                kwargs["inputs_embeds"] = torch.ones(
                    *ids.shape, config.hidden_size, dtype=torch.float64, device=ids.device
                )
            return (), {
                k: torch.ones_like(v, dtype=torch.float64) if v.is_floating_point() else v for k, v in kwargs.items()
            }
        first = batch[0] if isinstance(batch, (tuple, list)) else batch
        return (torch.ones_like(first, dtype=torch.float64),), {}
    if config is not None and hasattr(config, "image_size") and hasattr(config, "num_channels"):
        size = config.image_size
        return (), {"pixel_values": torch.ones(1, config.num_channels, size, size, dtype=torch.float64)}
    if config is not None and hasattr(config, "hidden_size"):
        return (), {"inputs_embeds": torch.ones(1, 8, config.hidden_size, dtype=torch.float64)}
    raise ValueError("SynFlow needs an input shape: pass calibration_data with one batch (only its shapes are used)")


def _flow(output: Any) -> Tensor:
    """R: the sum of the model output (logits if present, else the first output)."""
    if isinstance(output, Tensor):
        return output.sum()
    logits = getattr(output, "logits", None)
    return (logits if logits is not None else output[0]).sum()


@criterion("synflow")
def synflow_scores(scoring: ScoringContext) -> list[Tensor]:
    """Iterative SynFlow scores (∂R/∂θ) ⊙ θ on the positive-linear network."""
    weights = [t.weight for t in scoring.targets]
    args, kwargs = _ones_input(scoring)

    def score_round(originals: list[Tensor]) -> list[Tensor]:
        with scoring_mode(scoring.model, weights):
            grads = torch.autograd.grad(_flow(scoring.model(*args, **kwargs)), weights)
        return [g * w.detach() for g, w in zip(grads, weights, strict=True)]

    with positive_linear(scoring.model):
        return prune_in_rounds(scoring, score_round)
