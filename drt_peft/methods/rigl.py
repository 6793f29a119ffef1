"""RigL (Evci et al. 2020): drop the smallest weights, grow where the dense gradient is largest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import schedules
from ..config import Paper, register_method
from ..masks.dynamic import all_reduce_, capture_dense_gradients
from .drop_and_grow import DropAndGrow, DynamicConfig

if TYPE_CHECKING:
    from torch import Tensor

    from ..layer import DRTLayer
    from ..model import DRTModel


class RigLPolicy(DropAndGrow):
    """Grow where |∂L/∂Θ| of the update step is largest; the dense gradient is formed only in that step.

    An entry dropped and grown again in the same update keeps its value and optimizer state: RigL's
    update re-initialises only the connections that were not active before it (Evci et al. 2020,
    ``reinit_when_same=False`` in the authors' code).
    """

    keeps_regrown = True

    def on_attach(self, model: DRTModel, step: int = 0) -> None:
        super().on_attach(model, step)
        capture_dense_gradients((layer for _, layer in model.drt_layers()), self.config.is_update_step(step + 1))

    def grow_scores(self, i: int, name: str, layer: DRTLayer, step: int) -> Tensor:
        """|∂L/∂Θ| of the update step, summed over processes."""
        if layer.dense_grad is None:
            raise RuntimeError(
                f"RigL update at step {step}: layer {name} captured no dense gradient; call "
                "model.update_masks(step, optimizer) after every optimizer step (or use DRTCallback)"
            )
        return all_reduce_(layer.dense_grad).abs()

    def after_step(self, model: DRTModel, step: int) -> None:
        """Form the dense gradient in the next backward only if the next step updates the mask."""
        capture_dense_gradients((layer for _, layer in model.drt_layers()), self.config.is_update_step(step + 1))


@register_method("rigl")
@dataclass(frozen=True)
class RigLConfig(DynamicConfig):
    """Rigged Lottery: a random ERK mask to start; at every ``update_frequency``-th step t ≤ ``t_end``
    each layer drops the α_t fraction of its trained entries with the smallest |ϑ| and grows as many
    entries with the largest |∂L/∂Θ| among those not kept, α_t = α/2·(1 + cos(πt / t_end)),
    α = ``drop_fraction``. Grown entries start at Θ(0) (freeze) or 0 (prune) with zero optimizer
    state; an entry dropped and grown again at once keeps its value and state, as in RigL.

    The dense gradient is formed only in the backward of update steps (the step before arms the
    capture), summed over processes so every rank grows the same entries, then freed; between
    updates the backward is the sparse one. Call ``model.update_masks(step, optimizer)`` after every
    optimizer step (or use :class:`drt_peft.DRTCallback`).

    Example::

        config = RigLConfig(density=0.1, update_frequency=100, drop_fraction=0.3, t_end=7500)
        model = get_drt_model(base_model, config)
    """

    paper = Paper("Evci, Gale, Menick, Castro & Elsen", "Rigging the Lottery: Making All Tickets Winners", "ICML", 2020)

    drop_decay = staticmethod(schedules.cosine_decay)
    policy = RigLPolicy
