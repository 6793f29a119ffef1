"""Head warm-up before scoring: linear probing of the ``modules_to_save`` on the calibration data.

A gradient criterion scores with the head the model has at that moment. Fine-tuning adds a new,
randomly initialised classification head, so the loss gradient, and with it SNIP's, GraSP's or
FISH's scores, are mostly the random head's: a global ranking then spends the budget next to it.
With ``warmup_steps`` (data-driven configs) the head is trained alone first, as the linear probe of
LP-FT (Kumar et al., *Fine-Tuning can Distort Pretrained Features and Underperform
Out-of-Distribution*, ICLR 2022), and the criterion scores the model with the probed head.

The warm-up is part of scoring, not of training: like every criterion it leaves the model as it
found it (the head's values are restored afterwards, also when scoring fails), so the adapter
trains the head from the model's own values and ``unload()`` gives the model back unchanged.
It is deterministic: eval mode (no dropout), the calibration batches in their order, and Adam,
which draws nothing at random.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

from ..targeting import find_modules_to_save
from .calibration import batch_loss, calibration_batches, require_reiterable, scoring_mode
from .scoring import ScoringContext

logger = logging.getLogger(__name__)


def head_parameters(scoring: ScoringContext) -> list[nn.Parameter]:
    """The parameters of the config's ``modules_to_save`` in ``scoring.model`` (each once)."""
    model, config = scoring.model, scoring.config
    names = find_modules_to_save(model, config.modules_to_save_for(model))
    unique = {id(p): p for name in names for p in model.get_submodule(name).parameters()}
    return list(unique.values())


def warm_up_head(scoring: ScoringContext, parameters: list[nn.Parameter], steps: int, lr: float) -> list[float]:
    """Train ``parameters`` alone for ``steps`` Adam steps at the constant rate ``lr`` on the calibration batches
    (the first ``num_batches``, in order, read again as often as ``steps`` needs) in eval mode; the losses of the steps.

    Every other parameter is held fixed, and each ``.grad`` is left as it was.
    """
    optimizer = torch.optim.Adam(parameters, lr=lr)
    grads = [p.grad for p in parameters]
    losses: list[float] = []
    try:
        with scoring_mode(scoring.model, parameters):
            while len(losses) < steps:
                for batch in calibration_batches(scoring, scoring.config.num_batches):
                    loss = batch_loss(scoring.model, batch, scoring.loss_fn)
                    step = torch.autograd.grad(loss, parameters, allow_unused=True)
                    if all(g is None for g in step):
                        raise ValueError(
                            f"warmup_steps={steps}: the loss does not depend on the modules_to_save "
                            f"{list(scoring.config.modules_to_save or [])}, so warming them up changes nothing; "
                            "name the head the loss goes through, or set warmup_steps=0"
                        )
                    for p, g in zip(parameters, step, strict=True):
                        p.grad = g
                    optimizer.step()
                    losses.append(float(loss.detach()))
                    if len(losses) == steps:
                        break
    finally:
        for p, g in zip(parameters, grads, strict=True):
            p.grad = g
    return losses


@contextlib.contextmanager
def head_warmed_up(scoring: ScoringContext) -> Iterator[None]:
    """Within the block, the ``modules_to_save`` hold the values of the config's :attr:`~drt_peft.DRTConfig.head_warmup`
    (:func:`warm_up_head`); afterwards, also on error, their values before it. No warm-up: nothing happens."""
    steps, lr = scoring.config.head_warmup
    if not steps:
        yield
        return
    require_reiterable(scoring, "twice (for the head warm-up, then for the scores)")
    parameters = head_parameters(scoring)
    before = [p.detach().clone() for p in parameters]
    try:
        losses = warm_up_head(scoring, parameters, steps, lr)
        logger.info("head warm-up: %d steps at lr %g, loss %.4f → %.4f", steps, lr, losses[0], losses[-1])
        yield
    finally:
        with torch.no_grad():
            for p, value in zip(parameters, before, strict=True):
                p.copy_(value)
