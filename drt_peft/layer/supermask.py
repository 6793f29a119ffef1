"""The supermask layer (edge-popup): frozen weights Θ(0), a trained score per weight, Θ = Θ(0) ⊙ m(s).

ψ is the mask m(s), ϑ = Θ(0)[ψ] (times sign(s)[ψ] for the signed variant) is never trained:
the only trainable tensor of the layer is ``scores``. See :class:`SupermaskLayer`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..seeding import generator
from ..topk import top_k_mask
from .layer import DRTLayer
from .ops import autocast_forward

VARIANTS = ("top_k", "signed", "bernoulli")
#: What the ``"top_k"`` variant ranks: |s| (the reference code of Ramanujan et al. 2020) or s itself.
SCORE_RANKINGS = ("abs", "value")


class StraightThroughMask(torch.autograd.Function):
    """W_eff = W0 ⊙ m with the straight-through gradient ∂L/∂source = ∂L/∂W_eff ⊙ W0.

    ``mask`` (weight-shaped, in {0, 1} or {-1, 0, 1}) was computed from ``source`` without
    gradient; its gradient is passed to ``source`` unchanged (Ramanujan et al. 2020).
    """

    @staticmethod
    def forward(ctx: Any, source: Tensor, weight: Tensor, mask: Tensor) -> Tensor:
        ctx.save_for_backward(weight)
        ctx.source_dtype = source.dtype
        return weight * mask

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
        (weight,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return (grad * weight).to(ctx.source_dtype), None, None


def _sync_before_state_dict(module: SupermaskLayer, prefix: str, keep_vars: bool) -> None:
    module.sync_mask()


class SupermaskLayer(DRTLayer):
    """Weights frozen at Θ(0); a trainable score per weight chooses which of them are kept.

    State, besides :class:`DRTLayer`'s (in prune mode: unselected weights are zero):

    - ``scores`` — s, shaped like the weight: the layer's only trainable tensor. Its optimizer
      state is therefore D-sized by nature (2·D numbers per layer for AdamW);
    - ``drt_indices`` — ψ = the mask m(s), recomputed from the scores whenever it is read
      (:meth:`sync_mask`: :meth:`get_mask`, :attr:`num_trainable`, :meth:`effective_weight`,
      :meth:`merge`, the adapter tensors, ``state_dict`` and every forward outside training);
    - ``drt_values`` — ϑ = Θ(0)[ψ] (⊙ sign(s)[ψ] for ``"signed"``), never trained
      (``requires_grad`` is False), so the adapter stores no weight values.

    Variants (m is the mask the forward uses):

    - ``"top_k"`` (Ramanujan et al. 2020): m = the top-k of |s| (``score_ranking="abs"``, as the
      reference code ranks; the gradient then reaches s through |s|, i.e. times sign(s)) or of s
      (``"value"``), k = the layer's budget (density·D);
    - ``"signed"`` (Koster et al. 2022): m = sign(s) on the top-k of |s|, so a kept weight may be
      inverted; the signs of the kept weights are stored with the adapter (1 bit each);
    - ``"bernoulli"`` (Zhou et al. 2019): training draws m ~ Bernoulli(sigmoid(s)) from a CPU
      generator seeded by ``(seed, layer name, draw number)``; outside training m = sigmoid(s) > 0.5
      (about s > 0), so d is not fixed: :attr:`num_trainable` reports the realised count.

    Training forward: a dense product with W_eff = Θ(0) ⊙ m through :class:`StraightThroughMask`,
    so ∂L/∂s = ∂L/∂W_eff ⊙ Θ(0) (for ``"bernoulli"`` the gradient reaches sigmoid(s) and is
    chained through the sigmoid; for ``"top_k"`` ranking |s| it reaches |s|, so ∂L/∂s is multiplied
    by sign(s), as in the reference code). This forms a dense weight gradient, unlike the base layer.
    Evaluation forward (not training, no grad, or frozen scores): the base layer's prune-mode
    product with ψ and ϑ of the deterministic mask.

    :attr:`num_trainable` is d, the number of kept weights (what the checkpoint's mask holds),
    not the D scores the optimizer updates; ``DRTModel.get_nb_trainable_parameters`` counts those.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        indices: Tensor,
        variant: str,
        train_bias: bool = False,
        score_ranking: str = "abs",
    ) -> None:
        super().__init__(base_layer, indices, "prune", train_bias)
        if variant not in VARIANTS:
            raise ValueError(f"variant={variant!r} is not supported; use one of {list(VARIANTS)}")
        if score_ranking not in SCORE_RANKINGS:
            raise ValueError(f"score_ranking={score_ranking!r} is not supported; use one of {list(SCORE_RANKINGS)}")
        self.variant = variant
        #: What ``"top_k"`` ranks: ``"abs"`` (|s|) or ``"value"`` (s); ``"signed"`` always ranks |s|.
        self.score_ranking = score_ranking
        #: k, the number of weights the top-k variants keep (the layer's budget).
        self.k = indices.numel()
        self.drt_values.requires_grad_(False)
        self.scores = nn.Parameter(torch.zeros_like(base_layer.weight))
        #: Set by :meth:`seed_scores`; the Bernoulli draws are seeded by ``(seed, name, draws)``.
        self.name: str | None = None
        self.seed = 0
        self.draws = 0
        self._synced: tuple[int, int] | None = None
        self.register_state_dict_pre_hook(_sync_before_state_dict)

    def seed_scores(self, seed: int, name: str) -> None:
        """Draw the initial scores from ``(seed, name)``, once: later calls keep the trained scores.

        s = kaiming_uniform(a=√5) on the ``[out, fan_in]`` view (Ramanujan et al.'s initialisation);
        for ``"bernoulli"`` shifted by logit(k/D), so each weight starts kept with probability
        ≈ k/D (k/D capped half an entry away from 0 and 1).
        """
        if self.name is not None:
            return
        self.name, self.seed = name, seed
        weight = self.base_layer.weight
        matrix = torch.empty(self.op.to_matrix(weight).shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(matrix, a=math.sqrt(5), generator=generator(seed, "supermask-scores", name))
        if self.variant == "bernoulli":
            p = min(max(self.k, 0.5), weight.numel() - 0.5) / weight.numel()
            matrix += math.log(p / (1 - p))
        with torch.no_grad():
            self.scores.copy_(self.op.from_matrix(matrix))

    def _signs(self) -> Tensor:
        """sign(s) as ±1 (a zero score counts as +1), flat, in the weight's dtype."""
        flat = self.scores.detach().reshape(-1)
        return torch.where(flat < 0, -1.0, 1.0).to(self.base_layer.weight.dtype)

    def _kept(self, sample: bool) -> Tensor:
        """Flat boolean mask of the kept weights; ``sample``: a fresh Bernoulli draw (bernoulli only)."""
        flat = self.scores.detach().reshape(-1)
        if self.variant == "signed" or (self.variant == "top_k" and self.score_ranking == "abs"):
            return top_k_mask(flat.abs(), self.k)
        if self.variant == "top_k":
            return top_k_mask(flat, self.k)
        if not sample:
            return torch.sigmoid(flat) > 0.5
        draw = generator(self.seed, "supermask-draws", f"{self.name}:{self.draws}")
        self.draws += 1
        uniform = torch.rand(flat.shape, generator=draw).to(flat.device)
        return uniform < torch.sigmoid(flat.float())

    def sync_mask(self) -> None:
        """Set ψ and ϑ to the deterministic mask of the current scores.

        While the scores train this recomputes the mask on every call (one top-k over D, as each
        training forward does): optimizers may update them in place unseen. Frozen scores
        (inference) are read once, and again only after they change (load, in-place edit, move).
        """
        key = (self.scores.data_ptr(), self.scores._version)
        if not self.scores.requires_grad and key == self._synced:
            return
        with torch.no_grad():
            indices = torch.nonzero(self._kept(sample=False)).flatten()
            if not torch.equal(indices, self.drt_indices):
                self.update_indices(indices)
            values = self.base_layer.weight.reshape(-1)[indices]
            if self.variant == "signed":
                values = values * self._signs()[indices]
            self.drt_values.copy_(values)
        self._synced = None if self.scores.requires_grad else key

    @property
    def num_trainable(self) -> int:
        """d: the number of weights the current mask keeps (not the D scores that train)."""
        self.sync_mask()
        return self.drt_indices.numel()

    def get_mask(self) -> Tensor:
        self.sync_mask()
        return super().get_mask()

    def effective_weight(self) -> Tensor:
        self.sync_mask()
        return super().effective_weight()

    def adapter_tensors(self) -> dict[str, Tensor]:
        """For ``"signed"``: the signs of the d kept weights, 1 bit each (set bit: inverted)."""
        self.sync_mask()
        if self.variant != "signed":
            return {}
        inverted = (self._signs()[self.drt_indices] < 0).cpu().numpy()
        return {"signs": torch.from_numpy(np.packbits(inverted, bitorder="little"))}

    def load_adapter_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Set ϑ = Θ(0)[ψ] (⊙ the stored signs) and scores that reproduce the loaded mask ψ.

        The scores are not stored: the loaded ones are +1 on ψ (the stored sign for ``"signed"``)
        and 0 elsewhere (−1 for ``"bernoulli"``). Resuming score training needs a Trainer
        checkpoint, whose state dict holds the scores.
        """
        d = self.drt_indices.numel()
        signs = torch.ones(d, dtype=self.base_layer.weight.dtype, device=self.drt_indices.device)
        if self.variant == "signed":
            if set(tensors) != {"signs"} or tensors["signs"].numel() != (d + 7) // 8:
                got = {key: value.numel() for key, value in tensors.items()}
                raise ValueError(
                    f"a signed supermask layer needs the packed signs of its {d} kept weights "
                    f"({(d + 7) // 8} bytes), got {got}"
                )
            inverted = np.unpackbits(tensors["signs"].numpy(), count=d, bitorder="little").astype(bool)
            signs[torch.from_numpy(inverted).to(signs.device)] = -1
        else:
            super().load_adapter_tensors(tensors)
        with torch.no_grad():
            flat = self.scores.view(-1)
            flat.fill_(-1.0 if self.variant == "bernoulli" else 0.0)
            flat[self.drt_indices] = signs.to(flat.dtype)
            self.drt_values.copy_(self.base_layer.weight.reshape(-1)[self.drt_indices] * signs)
        self._synced = (self.scores.data_ptr(), self.scores._version)

    def get_extra_state(self) -> Tensor:
        """The number of Bernoulli draws so far, so a resumed run draws on."""
        return torch.tensor(self.draws, dtype=torch.int64)

    def set_extra_state(self, state: Tensor) -> None:
        self.draws = int(state)

    def _load_from_state_dict(self, state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
        """Move ψ to the saved mask first: its size (and ϑ's) varies with ``"bernoulli"``."""
        saved = state_dict.get(prefix + "drt_indices")
        if saved is not None:
            self.update_indices(saved)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and torch.is_grad_enabled() and self.scores.requires_grad):
            self.sync_mask()
            return super().forward(x)
        self._synced = None  # an optimizer step may follow, which the version counter need not see
        weight = self.base_layer.weight
        mask = self._kept(sample=True).to(weight.dtype)
        if self.variant == "signed":
            mask = mask * self._signs()
        source = self.scores
        if self.variant == "bernoulli":
            source = torch.sigmoid(self.scores)
        elif self.variant == "top_k" and self.score_ranking == "abs":
            source = self.scores.abs()  # the mask ranks |s|: the straight-through gradient reaches s times sign(s)
        effective = StraightThroughMask.apply(source, weight, mask.view(weight.shape))
        return autocast_forward(self.op, x, effective, self.base_layer.bias)

    def extra_repr(self) -> str:
        ranking = f", score_ranking={self.score_ranking!r}" if self.variant == "top_k" else ""
        return f"variant={self.variant!r}{ranking}, {super().extra_repr()}"
