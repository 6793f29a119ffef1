"""DEEP-R (Bellec, Kappel, Maass & Legenstein 2018): every connection has a fixed sign; one whose parameter
crosses zero goes dormant and a dormant one, drawn at random, takes its place."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.nn import functional

from ..config import Paper, register_method
from ..masks.dynamic import drop_weights
from ..seeding import generator
from .drop_and_grow import DropAndGrow, RewiringConfig

if TYPE_CHECKING:
    from ..layer import DRTLayer
    from ..model import DRTModel

#: Bit b of a byte of a sign bitmap: 1 << b (position k is bit k % 8 of byte k // 8, as in the ITOP bitmap).
_BITS = tuple(1 << b for b in range(8))


def _pack_bits(bits: Tensor) -> Tensor:
    """A boolean vector as bytes, position k at bit k % 8 of byte k // 8."""
    padded = functional.pad(bits.to(torch.uint8), (0, -bits.numel() % 8)).view(-1, 8)
    return (padded * torch.tensor(_BITS, dtype=torch.uint8, device=bits.device)).sum(1, dtype=torch.uint8)


def _bits_at(bitmap: Tensor, positions: Tensor) -> Tensor:
    """The bits of ``bitmap`` (:func:`_pack_bits`) at ``positions``, as 0/1 uint8."""
    return (bitmap[positions // 8] >> (positions % 8).to(torch.uint8)) & 1


class DeepRPolicy(DropAndGrow):
    """DEEP-R on the trained entries: θ_k = s_k·(ϑ_k − c_k), where c_k is the value a dormant entry holds
    (Θ(0)_k in freeze mode, 0 in prune mode) and s_k ∈ {−1, +1} a fixed sign. This is the paper's
    w_k = s_k·θ_k for an active connection (θ_k ≥ 0) and w_k = 0 for a dormant one (θ_k < 0), with the
    weight measured from c (Bellec et al. 2018, §2).

    After every optimizer step up to ``t_end`` every trained entry also takes the prior and noise terms of
    Algorithm 1, θ ← θ − η·α + √(2ηT)·ν (:meth:`prior_and_noise_step`; the optimizer took the gradient
    term); at every update step each layer drops the entries with θ < 0 (:meth:`drop`) and regrows as
    many at dormant positions drawn uniformly at random from ``(seed, step, layer)`` (the inherited
    :meth:`grow_scores`), which start at θ = 0, i.e. at c, with zero optimizer state.

    State: per layer the sign s_k of every one of the D positions, fixed for the whole run as in the
    paper (buffer ``signs_<i>`` for the i-th layer, a bitmap, bit set where s_k = −1), besides the ITOP
    bitmap. s_k is the sign of θ's starting point Θ(0)_k − c_k: of Θ(0)_k in prune mode, so every
    trained entry starts active with θ_k = |Θ(0)_k|; drawn from the seed where that is zero, i.e. at
    every position in freeze mode, where every entry starts at θ_k = 0.
    """

    config: DeepRConfig

    def on_attach(self, model: DRTModel, step: int = 0) -> None:
        super().on_attach(model, step)
        for i, (name, layer) in enumerate(model.drt_layers()):
            if not hasattr(self, f"signs_{i}"):
                self.register_buffer(f"signs_{i}", self._initial_signs(name, layer))

    def _initial_signs(self, name: str, layer: DRTLayer) -> Tensor:
        """The sign bitmap of layer ``name``: the sign of Θ(0) in prune mode, drawn from ``(seed, layer)`` where
        Θ(0) is zero and at every position in freeze mode."""
        weight = layer.base_layer.weight.detach().reshape(-1)  # Θ(0) itself in prune mode (never written)
        draws = generator(self.config.seed, "signs", name)
        negative = torch.randint(2, (weight.numel(),), dtype=torch.uint8, generator=draws).to(weight.device).bool()
        if self.config.mode == "prune":
            negative = torch.where(weight == 0, negative, weight < 0)
        return _pack_bits(negative)

    def signs(self, i: int, layer: DRTLayer) -> Tensor:
        """s of the i-th layer's trained entries (±1, in the dtype of ϑ)."""
        negative = _bits_at(getattr(self, f"signs_{i}"), layer.drt_indices)
        return 1 - 2 * negative.to(layer.drt_values.dtype)

    def thetas(self, i: int, layer: DRTLayer) -> Tensor:
        """θ = s·(ϑ − c) of the i-th layer's trained entries."""
        moved = drop_weights(layer, "change" if self.config.mode == "freeze" else "magnitude")
        return self.signs(i, layer) * moved

    def on_step(self, model: DRTModel, step: int, optimizer: Any) -> dict[str, float]:
        """Up to ``t_end`` the prior and noise step after every optimizer step, then the drop-and-grow loop (after
        ``t_end`` the entries train on a fixed mask, so none changes sign without being dropped)."""
        if self.config.rewiring_at(step):
            self.prior_and_noise_step(model, step, optimizer)
        return super().on_step(model, step, optimizer)

    def prior_and_noise_step(self, model: DRTModel, step: int, optimizer: Any) -> None:
        """θ ← θ − η·α + √(2ηT)·ν for every trained entry, i.e. ϑ ← ϑ + s·(√(2ηT)·ν − η·α) (Bellec et al. 2018,
        Algorithm 1, its terms beyond the gradient step): α = ``l1``, T = ``temperature``, η the current
        learning rate of the parameter group holding the layer's ϑ, ν ~ N(0, 1) drawn from ``(seed, step,
        layer)``, the same on every process."""
        alpha, temperature = self.config.l1, self.config.temperature
        rates = {id(p): float(group["lr"]) for group in optimizer.param_groups for p in group["params"]}
        for i, (name, layer) in enumerate(model.drt_layers()):
            values = layer.drt_values
            eta = rates[id(values)]
            shift = torch.full_like(values, -eta * alpha)
            if temperature:
                noise = torch.randn(values.numel(), generator=generator(self.config.seed, f"noise:{step}", name))
                shift += math.sqrt(2 * eta * temperature) * noise.to(shift)
            with torch.no_grad():
                values.add_(self.signs(i, layer) * shift)

    def drop(self, model: DRTModel, step: int) -> list[Tensor]:
        """Per layer, the trained entries whose θ fell below zero: they go dormant, a number that varies per update."""
        return [self.thetas(i, layer) < 0 for i, (_, layer) in enumerate(model.drt_layers())]

    def after_update(self, model: DRTModel, step: int, dropped: list[Tensor]) -> dict[str, float]:
        """Nothing to adapt: how many moved is already logged (``drt/moved``)."""
        return {}


@register_method("deep_r")
@dataclass(frozen=True)
class DeepRConfig(RewiringConfig):
    """Deep Rewiring: a random mask to start (ERK budget by default); each trained entry k is a connection
    with a fixed sign s_k and a parameter θ_k ≥ 0, its weight measured from the value it holds when
    dormant (Θ(0) in freeze mode, 0 in prune mode) being s_k·θ_k. After each optimizer step every θ also
    shrinks by η·α (``l1``) and takes Gaussian noise √(2ηT)·ν (``temperature``), η the learning rate;
    every ``update_frequency`` steps (every step by default, as in the paper) each layer drops the
    entries whose θ fell below zero and regrows as many at dormant positions drawn uniformly at random,
    at θ = 0. d per layer stays exact, so (like SET and RigL) it runs under DDP; every draw comes from
    ``(seed, step, layer)``, the same on every process. The signs are the state of the policy
    (``model.drt_policy.signs_<i>``) and travel in Trainer checkpoints.

    In freeze mode DEEP-R acts on the change ϑ − Θ(0): a trained entry may move from its frozen value
    only in the direction of its sign, and goes dormant (back to Θ(0)) when it crosses it, so, as in
    the paper, rewiring never changes the function (see docs/methods/deep_r.md).

    Example::

        config = DeepRConfig(density=0.02, mode="prune", temperature=1e-8, l1=1e-5)
        model = get_drt_model(base_model, config)
    """

    paper = Paper(
        "Bellec, Kappel, Maass & Legenstein", "Deep Rewiring: Training very sparse deep networks", "ICLR", 2018
    )

    policy = DeepRPolicy

    update_frequency: int = field(
        default=1,
        metadata={
            "help": "Steps between rewirings; 1, after every step, as in the paper. The l1 and noise terms apply "
            "after every step either way."
        },
    )
    temperature: float = field(
        default=2.5e-11,
        metadata={
            "help": "T: each step adds √(2ηT)·ν to every θ (η the learning rate, ν ~ N(0, 1)); a finite number >= 0, "
            "0 for no noise. The default is the authors' MNIST script's noise (1e-5·η at η = 0.5)."
        },
    )
    l1: float = field(
        default=1e-5,
        metadata={
            "help": "α of the L1 prior: each step every θ shrinks by η·α (η the learning rate); a finite number "
            ">= 0, 0 for none. The default is the authors' MNIST script's."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("temperature", "l1"):
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value!r} is not allowed; use a finite number >= 0 (0 turns the term off)")
