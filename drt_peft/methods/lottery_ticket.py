"""Lottery tickets (Frankle & Carbin 2019): iterative magnitude pruning with reset or late rewinding."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor

from ..config import DRTConfig, Paper, register_method
from ..masks.criteria.basic import lamp_scores, magnitude_scores
from ..policy import Policy
from ..schedules import lottery_densities, lottery_rounds
from ..validation import check_int

if TYPE_CHECKING:
    from ..masks import Criterion
    from ..model import DRTModel


class LotteryPolicy(Policy):
    """What a lottery round does besides training: keep Θ(k) for late rewinding, and hand per-layer state
    over to the next round.

    State: Θ(k), the values at optimizer step ``rewind_step`` of the dense round, as buffers (so they follow
    ``model.to`` and travel in Trainer checkpoints): ``rewind_<i>`` for the i-th layer's ϑ,
    ``rewind_bias_<i>`` for its trained bias, ``rewind_save_<j>`` for the j-th tensor of the
    ``modules_to_save``. :meth:`rewind_snapshot` names them as :func:`drt_peft.find_lottery_ticket`
    writes them next to the rounds.
    """

    config: LotteryTicketConfig

    def _records_rewind(self) -> bool:
        return bool(self.config.rewind_step) and self.config.density == 1.0

    def on_attach(self, model: DRTModel, step: int = 0) -> None:
        if self._records_rewind():
            model.expect_update_masks(self.config.rewind_step)

    def on_step(self, model: DRTModel, step: int, optimizer: Any) -> dict[str, float]:
        """In the dense round, keep Θ(k) (every targeted weight, trained bias and ``modules_to_save``) at step k."""
        if step == self.config.rewind_step and self._records_rewind():
            for buffer, _, value in self._entries(model):
                self.register_buffer(buffer, value.detach().clone())
        return {}

    def _entries(self, model: DRTModel) -> list[tuple[str, str, Tensor]]:
        """What Θ(k) holds, in a fixed order: ``(buffer name, name in the snapshot, live tensor)``."""
        entries = []
        for i, (name, layer) in enumerate(model.drt_layers()):
            entries.append((f"rewind_{i}", f"drt.{name}", layer.drt_values))
            bias = layer.trained_bias()
            if bias is not None:
                entries.append((f"rewind_bias_{i}", f"bias.{name}", bias))
        saved = [
            (f"save.{name}.{key}", value)
            for name in model.modules_to_save
            for key, value in model.get_base_model().get_submodule(name).state_dict().items()
        ]
        return entries + [(f"rewind_save_{j}", key, value) for j, (key, value) in enumerate(saved)]

    def rewind_snapshot(self, model: DRTModel) -> dict[str, Tensor] | None:
        """Θ(k) by name (``drt.<layer>``, ``bias.<layer>``, ``save.<module>.<key>``), or None before step k."""
        if not hasattr(self, "rewind_0"):
            return None
        return {name: getattr(self, buffer) for buffer, name, _ in self._entries(model)}

    def carry_over(self, model: DRTModel, indices: list[Tensor]) -> list[Tensor] | None:
        """Per-layer state the next round inherits when ψ shrinks to ``indices`` (none: dropped entries are
        simply pruned or frozen by ``mode``); see :class:`~drt_peft.PruneOrFreezeConfig`."""
        return None

    def restore(self, model: DRTModel, carried: list[Tensor]) -> None:
        """Apply what :meth:`carry_over` returned to the next round's freshly built model."""


@register_method("lottery_ticket")
@dataclass(frozen=True)
class LotteryTicketConfig(DRTConfig):
    """Iterative magnitude pruning (IMP) towards a winning ticket, driven by :func:`drt_peft.find_lottery_ticket`.

    Each round trains the current sub-network, then keeps the ``1 − prune_fraction`` largest
    trained weights |ϑ| among the survivors (over all layers with ``budget="global"``, per layer
    with ``"uniform"``) and resets them to Θ(0), or with ``rewind_step = k`` to Θ(k), their value
    after k steps of the first, dense training (late rewinding, Frankle et al. 2020). Reaching
    density ``density`` = 1 − p takes ⌈log(1 − p) / log(1 − prune_fraction)⌉ rounds (survey eq. 18:
    p = 0.9 and a fraction 0.2 give 11 rounds, 12 trainings with the dense one); ``one_shot`` prunes
    to the target after the dense training (2 trainings). ``layer_adaptive`` ranks by LAMP scores
    (Lee et al. 2021) instead of raw magnitudes.

    Attached directly with ``get_drt_model``, the config prunes the given (trained) model's weights
    by magnitude to ``density`` in one shot.

    Example::

        config = LotteryTicketConfig(density=0.1, rewind_step=500, target_modules="all-linear")
        ticket = find_lottery_ticket(model, config, train_fn=my_training, output_dir="imp")
        ticket.save_pretrained("ticket")
    """

    paper = Paper(
        "Frankle & Carbin", "The Lottery Ticket Hypothesis: Finding Sparse, Trainable Neural Networks", "ICLR", 2019
    )

    mode: str = field(default="prune", metadata={"help": "As in DRTConfig; tickets are pruned networks."})
    budget: str = field(
        default="global", metadata={"help": "'global': one magnitude threshold over all layers; 'uniform': per layer."}
    )
    prune_fraction: float = field(
        default=0.2, metadata={"help": "Fraction p0 of the remaining weights pruned after each round, 0 < p0 < 1."}
    )
    rewind_step: int = field(
        default=0,
        metadata={
            "help": "0 resets survivors to Θ(0); k > 0 rewinds them to Θ(k), their value after optimizer step k "
            "of the dense training (needs model.update_masks(step, optimizer) or DRTCallback during it)."
        },
    )
    one_shot: bool = field(default=False, metadata={"help": "Prune to `density` in one round after the dense run."})
    layer_adaptive: bool = field(
        default=False, metadata={"help": "Rank by LAMP scores (Lee et al. 2021) instead of raw magnitudes."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.density is None:
            raise ValueError(
                f"{type(self).__name__} needs density (the ticket's final density), not num_trainable="
                f"{self.num_trainable}"
            )
        if not isinstance(self.prune_fraction, (int, float)) or not 0 < self.prune_fraction < 1:
            raise ValueError(f"prune_fraction={self.prune_fraction!r} must satisfy 0 < prune_fraction < 1")
        check_int("rewind_step", self.rewind_step, minimum=0, hint=" (0 resets to Θ(0))")
        self.allow_only(
            "tickets keep the largest magnitudes, over all layers or per layer",
            budget=("global", "uniform"),
            structure="unstructured",
        )

    policy = LotteryPolicy

    @property
    def criterion(self) -> Criterion:  # type: ignore[override]
        return lamp_scores if self.layer_adaptive else magnitude_scores

    @property
    def num_rounds(self) -> int:
        """Pruning rounds to reach ``density`` (survey eq. 18); the search trains ``num_rounds + 1`` times."""
        return lottery_rounds(self.density, self.prune_fraction, self.one_shot)

    def round_densities(self) -> list[float]:
        """The density trained in each round: 1 (dense), (1 − p0), (1 − p0)², …, ending at ``density``."""
        return lottery_densities(self.density, self.prune_fraction, self.one_shot)
