"""Field groups shared by several methods: calibration data and iterative schedules."""

from __future__ import annotations

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

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("num_batches", self.num_batches, optional=True, hint=" (None: all batches)")


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
