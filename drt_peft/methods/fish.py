"""FISH mask (Sung et al. 2021): the empirical Fisher information of each weight."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import register_method
from .base import DataDrivenConfig

FISHER_LABELS = ("true", "predicted")


@register_method("fish")
@dataclass
class FISHConfig(DataDrivenConfig):
    """Train the entries with the largest mean squared per-sample gradient of log p(y|x).

    The fine-tuning standard is 0.5% of the weights (``density=0.005``) with one global top-k
    (the default budget here).
    Each sample gets its own backward; only the running sum of squares is kept.

    Example::

        config = FISHConfig(density=0.005, num_samples=1024, modules_to_save=["classifier"])
        model = get_drt_model(base_model, config, calibration_data=train_batches)
    """

    criterion = "fisher"

    budget: str = field(default="global", metadata={"help": "As in DRTConfig; FISH ranks all layers jointly."})
    num_samples: int = field(
        default=1024, metadata={"help": "Number N of samples the Fisher averages over (one backward each)."}
    )
    fisher_labels: str = field(
        default="true",
        metadata={"help": "y in log p(y|x): 'true' labels of the batches or the model's own 'predicted' arg-max."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ValueError(f"num_samples={self.num_samples!r} must be a positive integer")
        if self.fisher_labels not in FISHER_LABELS:
            raise ValueError(f"fisher_labels={self.fisher_labels!r} is not supported; use one of {list(FISHER_LABELS)}")
