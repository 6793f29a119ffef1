"""Field groups shared by several methods: calibration data and iterative schedules."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor

from .. import schedules
from ..config import DRTConfig
from ..masks.dynamic import regrow, smallest_magnitudes, trained_values_finite
from ..schedules import ROUND_SCHEDULES
from ..seeding import generator
from ..validation import check_choice, check_int

if TYPE_CHECKING:
    from ..layer import DRTLayer


@dataclass
class DataDrivenConfig(DRTConfig):
    """Methods that score weights on ``calibration_data`` passed to ``get_drt_model``."""

    num_batches: int | None = field(
        default=None, metadata={"help": "How many calibration batches the scores use (None: all of them)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("num_batches", self.num_batches, optional=True, hint=" (None: all batches)")


@dataclass
class IterativeConfig(DRTConfig):
    """Methods that prune over several rounds, re-scoring the masked network each round."""

    default_rounds: ClassVar[int] = 10

    rounds: int | None = field(
        default=None,
        metadata={"help": "Number of pruning rounds k (None: the method's default, e.g. 100 for SynFlow)."},
    )
    schedule: str = field(
        default="exponential",
        metadata={
            "help": "Densities of the rounds: 'exponential' density^(r/k) or 'linear' 1 - r(1 - density)/k, r = 1..k."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rounds is None:
            self.rounds = self.default_rounds
        check_int("rounds", self.rounds)
        check_choice("schedule", self.schedule, ROUND_SCHEDULES)


@dataclass
class DynamicConfig(DRTConfig):
    """Dynamic sparse training (survey §6): ψ changes every ``update_frequency`` steps, d stays exact."""

    #: Whether the drop fraction decays as α/2·(1 + cos(πt/t_end)) (RigL, SNFS); then ``t_end`` is required.
    cosine_decay: ClassVar[bool] = False
    criterion = "random"

    budget: str = field(
        default="erk", metadata={"help": "As in DRTConfig; dynamic methods start from a random ERK mask by default."}
    )

    update_frequency: int = field(
        default=100, metadata={"help": "Fp: steps between mask updates (updates run at step = Fp, 2·Fp, ...)."}
    )
    drop_fraction: float = field(
        default=0.3, metadata={"help": "q: fraction of each layer's trained entries dropped and regrown per update."}
    )
    t_end: int | None = field(
        default=None, metadata={"help": "Last step at which the mask may change (None: never stops)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("update_frequency", self.update_frequency)
        if not isinstance(self.drop_fraction, (int, float)) or not 0 < self.drop_fraction < 1:
            raise ValueError(f"drop_fraction={self.drop_fraction!r} must satisfy 0 < drop_fraction < 1")
        check_int("t_end", self.t_end, optional=True)
        if self.cosine_decay and self.t_end is None:
            raise ValueError(
                f"t_end=None: {type(self).__name__}'s cosine decay α_t = α/2·(1 + cos(πt/t_end)) needs the last update "
                "step (Evci et al. use 75% of the training steps)"
            )
        if self.structure != "unstructured":
            raise ValueError(
                f"structure={self.structure!r} is not supported by {self.method_name!r}; "
                "dynamic methods use 'unstructured'"
            )

    @property
    def needs_optimizer(self) -> bool:
        return True

    def check_training_length(self, max_steps: int) -> None:
        if self.t_end is not None and self.t_end > max_steps:
            raise ValueError(
                f"t_end={self.t_end} is beyond the training length (max_steps={max_steps}); "
                f"set t_end <= {max_steps}, e.g. 75% of the steps as in RigL"
            )

    def on_attach(self, model: Any, step: int = 0) -> None:
        for _, layer in model.drt_layers():
            layer.track_exploration()
        model.expect_update_masks(self.update_frequency)

    def on_step(self, model: Any, step: int, optimizer: Any) -> dict[str, float]:
        """Drop and grow (survey §6), the loop every dynamic method shares; the methods differ in its hooks.

        After every step :meth:`observe` sees the model (SNFS's momentum). At an update step with
        finite values, each layer drops the entries :meth:`drop` marks, grows as many in all as
        :meth:`grow_counts` spreads over the layers (per layer what it dropped, unless a method
        redistributes) where :meth:`grow_scores` is largest, and keeps its optimizer state aligned
        (:func:`~drt_peft.masks.dynamic.regrow`); :meth:`after_update` then adapts the method's state
        and says what to log. :meth:`after_step` runs last (RigL arms its dense gradient).
        """
        self.observe(model, step)
        logs: dict[str, float] = {}
        if self.updates_at(model, step):
            dropped = self.drop(model, step)
            layers = list(model.drt_layers())
            for (name, layer), drop, grow in zip(layers, dropped, self.grow_counts(model, dropped), strict=True):
                regrow(layer, drop, grow, self.grow_scores(name, layer, step), optimizer)
            logs = {
                "drt/moved": float(sum(int(drop.sum()) for drop in dropped)),
                **self.after_update(model, step, dropped),
            }
        self.after_step(model, step)
        return logs

    def observe(self, model: Any, step: int) -> None:
        """Called after every optimizer step, before any update (nothing by default)."""

    def drop(self, model: Any, step: int) -> list[Tensor]:
        """Per layer, a boolean over ψ of the entries to drop: by default the q_t fraction with the smallest |ϑ|."""
        fraction = self.drop_fraction_at(step)
        return [smallest_magnitudes(layer, round(fraction * layer.num_trainable)) for _, layer in model.drt_layers()]

    def grow_counts(self, model: Any, dropped: list[Tensor]) -> list[int]:
        """How many entries each layer grows: by default as many as it dropped, so d per layer stays."""
        return [int(drop.sum()) for drop in dropped]

    def grow_scores(self, name: str, layer: DRTLayer, step: int) -> Tensor:
        """Weight-shaped scores; a layer grows where they are largest. By default uniform random draws from
        ``(seed, step, layer)``, the same on every process."""
        return torch.rand(layer.weight_shape, generator=generator(self.seed, f"grow:{step}", name))

    def after_update(self, model: Any, step: int, dropped: list[Tensor]) -> dict[str, float]:
        """Adapt the method's state after an update; return values worth logging (the drop fraction where it
        decays)."""
        return {"drt/drop_fraction": self.drop_fraction_at(step)} if self.cosine_decay else {}

    def after_step(self, model: Any, step: int) -> None:
        """Called last after every optimizer step (nothing by default)."""

    def drop_fraction_at(self, step: int) -> float:
        """q_t: ``drop_fraction``, or with ``cosine_decay`` α/2 · (1 + cos(π t / t_end))."""
        if not self.cosine_decay:
            return self.drop_fraction
        return schedules.cosine_decay(self.drop_fraction, step, self.t_end)

    def require_single_process(self) -> None:
        """Refuse to run across processes: for methods that move d between layers (SNFS, DSR)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise RuntimeError(
                f"{type(self).__name__} moves trained entries between layers, which changes parameter sizes that "
                "DDP and FSDP fix when they wrap the model; run it in one process, or use SETConfig / RigLConfig"
            )

    def updates_at(self, model: Any, step: int) -> bool:
        """Whether the mask moves after optimizer step ``step``: an update step whose trained values are all
        finite (a non-finite step is skipped with a warning: :func:`~drt_peft.masks.dynamic.trained_values_finite`)."""
        return self.is_update_step(step) and trained_values_finite(model, step)

    def is_update_step(self, step: int) -> bool:
        """Whether the mask changes after optimizer step ``step``."""
        return step > 0 and step % self.update_frequency == 0 and (self.t_end is None or step <= self.t_end)
