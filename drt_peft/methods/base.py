"""Field groups shared by several methods: calibration data and iterative schedules."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..config import DRTConfig

SCHEDULES = ("exponential", "linear")


@dataclass
class DataDrivenConfig(DRTConfig):
    """Methods that score weights on ``calibration_data`` passed to ``get_drt_model``."""

    num_batches: int | None = field(
        default=None, metadata={"help": "How many calibration batches the scores use (None: all of them)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_batches is not None and (not isinstance(self.num_batches, int) or self.num_batches < 1):
            raise ValueError(f"num_batches={self.num_batches!r} must be a positive integer or None (all batches)")


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
        if not isinstance(self.rounds, int) or isinstance(self.rounds, bool) or self.rounds < 1:
            raise ValueError(f"rounds={self.rounds!r} must be a positive integer")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is not supported; use one of {list(SCHEDULES)}")
