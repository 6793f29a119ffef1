"""Θ(0) of the targeted weights: seeded re-initialisation and the fingerprint checked on load."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .masks import Target
from .seeding import generator


def seeded_init_(targets: Sequence[Target], model: nn.Module, seed: int) -> None:
    """Re-initialise each target's weight from ``(seed, name)`` as the model's own init would.

    transformers models with ``config.initializer_range`` draw N(0, initializer_range²) (their
    ``_init_weights`` convention); transformers' ``Conv1D`` draws N(0, 0.02²) (its own init);
    other modules use PyTorch's default ``kaiming_uniform_(a=√5)``. Draws happen in float32 on a
    CPU generator, so the frozen values are regenerable from the 32-bit seed on any device
    (survey eqs. 21-22).
    """
    std = getattr(getattr(model, "config", None), "initializer_range", None)
    for target in targets:
        values = torch.empty(target.weight.shape, dtype=torch.float32)
        g = generator(seed, "init", target.name)
        if std is not None:
            nn.init.normal_(values, 0.0, std, generator=g)
        elif isinstance(target.module, Conv1D):
            nn.init.normal_(values, 0.0, 0.02, generator=g)
        else:
            nn.init.kaiming_uniform_(values, a=math.sqrt(5), generator=g)
        with torch.no_grad():
            target.weight.copy_(values)


def fingerprint(targets: Sequence[Target]) -> str:
    """SHA-256 over the targets' names, shapes, dtypes and weight bytes (``"sha256:<hex>"``)."""
    digest = hashlib.sha256()
    for target in targets:
        weight = target.weight.detach().cpu().contiguous()
        digest.update(f"{target.name}|{tuple(weight.shape)}|{weight.dtype}\n".encode())
        digest.update(weight.reshape(-1).view(torch.uint8).numpy())
    return "sha256:" + digest.hexdigest()
