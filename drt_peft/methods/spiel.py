"""SpIEL-AG (Ansell, Vulić, Sterz, Korhonen & Ponti 2024): sparse fine-tuning that drops the entries training
moved least and grows where gradients accumulated over a few steps are largest."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .. import schedules
from ..config import Paper, register_method, setting
from ..masks.dynamic import all_reduce_, capture_dense_gradients
from ..validation import check_int
from .drop_and_grow import DropAndGrow, DynamicConfig

if TYPE_CHECKING:
    from torch import Tensor

    from ..layer import DRTLayer
    from ..model import DRTModel


class SpIELPolicy(DropAndGrow):
    """Drop and grow with growth by the gradient summed over the γ = ``accumulation_steps`` steps that end at each
    update: G = Σ ∂L/∂Θ over steps u − γ + 1, …, u.

    The dense gradient is formed only in the backwards of those γ steps (the step before the window arms the
    capture, as RigL does for its single step). After each of them G moves into a weight-sized buffer of the
    policy (``accumulated_<i>`` for the i-th layer), which lives only during the window, so a checkpoint taken
    inside it resumes the sum, and is freed after the update. Between windows the backward is the sparse one
    and the training state is ∝ d. An entry dropped and grown again in the same update keeps its value and
    optimizer state, as in SpIEL (the code leaves indices that would leave and come back untouched).
    """

    config: SpIELConfig
    keeps_regrown = True

    def on_attach(self, model: DRTModel, step: int = 0) -> None:
        """Keep a window's sums only when resuming inside that window, on the layers' devices; arm the capture."""
        super().on_attach(model, step)
        if not (self.in_window(step) and not self.config.is_update_step(step)):
            self._free_sums()
        for i, (_, layer) in enumerate(model.drt_layers()):
            name = f"accumulated_{i}"
            if hasattr(self, name):
                setattr(self, name, getattr(self, name).to(layer.drt_indices.device))
        self._arm(model, step + 1)

    def in_window(self, step: int) -> bool:
        """Whether the gradient of optimizer step ``step`` counts towards the growth scores of the update that ends
        its window (an update that moves entries: before ``t_end``, at a drop fraction above 0)."""
        frequency = self.config.update_frequency
        update = -(-step // frequency) * frequency
        return (
            step > update - self.config.accumulation_steps
            and self.config.is_update_step(update)
            and self.config.drop_fraction_at(update) > 0
        )

    def observe(self, model: DRTModel, step: int) -> None:
        """Inside a window, add each layer's dense gradient of this step, summed over processes, to its buffer.

        Every rank so holds the same sums, and a checkpoint written by one of them resumes the window on all. A
        layer that took no part in this step's forward adds nothing; a step with a non-finite gradient adds
        nothing, with a warning (an fp16 step the loss scaler skips, for instance)."""
        if not self.in_window(step):
            return
        layers = list(model.drt_layers())
        if all(layer.dense_grad is None for _, layer in layers):
            raise RuntimeError(
                f"SpIEL at step {step}: no layer captured a dense gradient; call model.update_masks(step, optimizer) "
                "after every optimizer step (or use DRTCallback)"
            )
        grads = {i: all_reduce_(layer.dense_grad.to(torch.float32, copy=True)) for i, (_, layer) in enumerate(layers)
                 if layer.dense_grad is not None}  # fmt: skip
        for _, layer in layers:
            layer.dense_grad = None  # the capture stays armed for the rest of the window
        if not all(bool(torch.isfinite(grad).all()) for grad in grads.values()):
            warnings.warn(
                f"step {step}: non-finite gradients; SpIEL leaves them out of its growth scores", stacklevel=3
            )
            return
        for i, grad in grads.items():
            accumulated = getattr(self, f"accumulated_{i}", None)
            if accumulated is None:
                self.register_buffer(f"accumulated_{i}", grad)
            else:
                accumulated.add_(grad)

    def grow_scores(self, i: int, name: str, layer: DRTLayer, step: int) -> Tensor:
        """|G|, the window's dense gradient summed over steps and processes (zero where the layer saw none)."""
        accumulated = getattr(self, f"accumulated_{i}", None)
        if accumulated is None:
            return torch.zeros(layer.weight_shape, device=layer.drt_indices.device)
        return accumulated.abs()

    def after_step(self, model: DRTModel, step: int) -> None:
        """Free the window's buffers after its update step; arm the capture if the next step is in a window."""
        if self.config.is_update_step(step):
            self._free_sums()
        self._arm(model, step + 1)

    def _free_sums(self) -> None:
        """Drop every layer's window buffer (``accumulated_<i>``)."""
        for name in [name for name in self._buffers if name.startswith("accumulated_")]:
            delattr(self, name)

    def _arm(self, model: DRTModel, step: int) -> None:
        capture_dense_gradients((layer for _, layer in model.drt_layers()), self.in_window(step))


@register_method("spiel")
@dataclass(frozen=True)
class SpIELConfig(DynamicConfig):
    """SpIEL-AG, sparse fine-tuning of a pretrained model: a random mask of the same density in every layer to
    start; every ``update_frequency`` steps until ``t_end`` each layer drops the ζ_t fraction of its trained
    entries that training moved least, smallest |ϑ − Θ(0)| (``drop_criterion="change"``; an entry dropped
    returns to Θ(0)), and grows as many where |G| is largest among the others, G the dense gradient summed over
    the ``accumulation_steps`` steps that end at the update (Ansell et al. 2024, "accumulated gradients"
    regrowth). ζ_t = ζ·(1 − t/t_end) decays linearly, ζ = ``drop_fraction``. Grown entries start at Θ(0)
    with zero optimizer state; an entry dropped and grown again at once keeps both.

    Cost: the dense weight gradient in the ``accumulation_steps`` backwards before each update, summed into a
    transient weight-sized buffer per layer (all candidates are scored; the paper keeps a subset to save
    memory). d per layer stays exact and G is summed over processes, so it runs under DDP.

    Example::

        config = SpIELConfig(density=0.005, update_frequency=100, accumulation_steps=5, t_end=3000)
        model = get_drt_model(base_model, config)
    """

    paper = Paper(
        "Ansell, Vulić, Sterz, Korhonen & Ponti", "Scaling Sparse Fine-Tuning to Large Language Models", "arXiv", 2024
    )
    paper_setting = setting(budget="uniform", mode="freeze", drop_criterion="change")

    drop_decay = staticmethod(schedules.linear_decay)
    policy = SpIELPolicy

    budget: str = field(
        default="uniform",
        metadata={"help": "As in DRTConfig; every weight matrix trains the same fraction, as in SpIEL."},
    )
    drop_fraction: float = field(
        default=0.2,
        metadata={
            "help": "ζ: fraction of each layer's trained entries dropped and regrown at step 0, decayed linearly "
            "to 0 at t_end (SpIEL's initial reselection rate, 0.2)."
        },
    )
    drop_criterion: str = field(
        default="change",
        metadata={
            "help": "As in DynamicConfig; 'change' (|ϑ − Θ(0)|, what SpIEL drops by) needs mode='freeze', "
            "use 'magnitude' in prune mode."
        },
    )
    accumulation_steps: int = field(
        default=5,
        metadata={
            "help": "γ: steps whose dense gradients are summed into the growth scores of the update that ends "
            "them, 1 <= γ <= update_frequency (1 is RigL's growth)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("accumulation_steps", self.accumulation_steps)
        if self.accumulation_steps > self.update_frequency:
            raise ValueError(
                f"accumulation_steps={self.accumulation_steps} exceeds update_frequency={self.update_frequency}: "
                "the gradients are summed over steps since the last update, so use "
                f"1 <= accumulation_steps <= {self.update_frequency}"
            )
