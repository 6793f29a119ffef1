"""Field groups shared by several methods: calibration data and iterative schedules."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from ..config import DRTConfig
from ..schedules import ROUND_SCHEDULES
from ..validation import check_choice, check_int


@dataclass(frozen=True)
class DataDrivenConfig(DRTConfig):
    """Methods that score weights on ``calibration_data`` passed to ``get_drt_model``."""

    num_batches: int | None = field(
        default=None, metadata={"help": "How many calibration batches the scores use (None: all of them)."}
    )
    warmup_steps: int = field(
        default=0,
        metadata={
            "help": "Before scoring, train only the modules_to_save (a new head) for this many Adam steps on the "
            "calibration batches (the first num_batches, in order, again as needed), in eval mode, so the scores "
            "are not those of a random head (linear probing, Kumar et al. 2022). The head is restored after "
            "scoring: the adapter trains it from the model's own values. 0: no warm-up."
        },
    )
    warmup_lr: float = field(
        default=1e-2,
        metadata={
            "help": "Learning rate of the head warm-up's Adam (constant); used with warmup_steps. A linear probe "
            "takes rates above fine-tuning's."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("num_batches", self.num_batches, optional=True, hint=" (None: all batches)")
        check_int("warmup_steps", self.warmup_steps, minimum=0, hint=" (0: no warm-up)")
        lr = self.warmup_lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"warmup_lr={lr!r} must be a finite number > 0 (the head warm-up's learning rate)")
        if self.warmup_steps and not self.modules_to_save:
            raise ValueError(
                f"warmup_steps={self.warmup_steps} trains the modules_to_save before scoring, and modules_to_save="
                f"{self.modules_to_save!r} names none: name the new head (e.g. modules_to_save=['classifier']), "
                "or set warmup_steps=0"
            )

    @property
    def head_warmup(self) -> tuple[int, float]:
        return self.warmup_steps, float(self.warmup_lr)


@dataclass(frozen=True)
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
            self._normalise("rounds", self.default_rounds)
        check_int("rounds", self.rounds)
        check_choice("schedule", self.schedule, ROUND_SCHEDULES)
