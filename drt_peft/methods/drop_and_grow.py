"""Drop and grow (survey §6): the policy every dynamic sparse training method shares, with its hooks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor

from ..config import DRTConfig
from ..masks.budgets import line_caps
from ..masks.criteria.basic import random_scores
from ..masks.dynamic import DROP_CRITERIA, regrow, smallest_magnitudes, trained_values_finite
from ..policy import Policy
from ..seeding import generator
from ..validation import check_choice, check_int

if TYPE_CHECKING:
    from ..layer import DRTLayer


class DropAndGrow(Policy):
    """The loop every dynamic method shares, by default dropping the smallest |ϑ| and growing at random (survey
    §6); SET, RigL, SNFS, DSR and DEEP-R override the hooks that differ.

    After every step :meth:`observe` sees the model (SNFS's momentum). At an update step with
    finite values, each layer drops the entries :meth:`drop` marks, grows as many in all as
    :meth:`grow_counts` spreads over the layers (per layer what it dropped, unless a method
    redistributes) where :meth:`grow_scores` is largest, and keeps its optimizer state aligned
    (:func:`~drt_peft.masks.dynamic.regrow`; an entry dropped and grown again at once starts
    afresh unless :attr:`keeps_regrown`); :meth:`after_update` then adapts the method's state
    and says what to log. :meth:`after_step` runs last (RigL arms its dense gradient).

    State: per layer a bitmap of the D positions ever trained (buffer ``explored_<i>`` for the
    i-th layer), from which :meth:`statistics` reports the ITOP exploration rate (Liu et al. 2021).
    """

    config: DynamicConfig

    #: Whether an entry dropped and grown again in the same update keeps its value and optimizer state (RigL)
    #: instead of starting afresh like any grown entry (SET, SNFS, DSR, DEEP-R).
    keeps_regrown: ClassVar[bool] = False

    @property
    def needs_optimizer(self) -> bool:
        return True

    def on_attach(self, model: Any, step: int = 0) -> None:
        for i, (_, layer) in enumerate(model.drt_layers()):
            if not hasattr(self, f"explored_{i}"):
                numel = layer.base_layer.weight.numel()
                bitmap = torch.zeros((numel + 7) // 8, dtype=torch.uint8, device=layer.drt_indices.device)
                self.register_buffer(f"explored_{i}", bitmap)
                self._mark_explored(i, layer.drt_indices)
        model.expect_update_masks(self.config.update_frequency)

    def on_step(self, model: Any, step: int, optimizer: Any) -> dict[str, float]:
        self.observe(model, step)
        logs: dict[str, float] = {}
        if self.updates_at(model, step):
            dropped = self.drop(model, step)
            layers = list(model.drt_layers())
            for i, ((name, layer), drop, grow) in enumerate(
                zip(layers, dropped, self.grow_counts(model, dropped), strict=True)
            ):
                scores = self.grow_scores(i, name, layer, step)
                regrow(layer, drop, grow, scores, optimizer, keep_regrown=self.keeps_regrown, caps=self._caps(layer))
                self._mark_explored(i, layer.drt_indices)
            logs = {
                "drt/moved": float(sum(int(drop.sum()) for drop in dropped)),
                **self.after_update(model, step, dropped),
            }
        self.after_step(model, step)
        return logs

    def observe(self, model: Any, step: int) -> None:
        """Called after every optimizer step, before any update (nothing by default)."""

    def drop(self, model: Any, step: int) -> list[Tensor]:
        """Per layer, a boolean over ψ of the entries to drop: by default the q_t fraction with the smallest |ϑ|
        (|ϑ − Θ(0)| with ``drop_criterion="change"``)."""
        fraction, criterion = self.config.drop_fraction_at(step), self.config.drop_criterion
        return [
            smallest_magnitudes(layer, round(fraction * layer.num_trainable), criterion)
            for _, layer in model.drt_layers()
        ]

    def grow_counts(self, model: Any, dropped: list[Tensor]) -> list[int]:
        """How many entries each layer grows: by default as many as it dropped, so d per layer stays."""
        return [int(drop.sum()) for drop in dropped]

    def grow_scores(self, i: int, name: str, layer: DRTLayer, step: int) -> Tensor:
        """Weight-shaped scores for the i-th layer, ``name``; it grows where they are largest. By default
        uniform random draws from ``(seed, step, layer)``, the same on every process."""
        return torch.rand(layer.weight_shape, generator=generator(self.config.seed, f"grow:{step}", name))

    def after_update(self, model: Any, step: int, dropped: list[Tensor]) -> dict[str, float]:
        """Adapt the method's state after an update; return values worth logging (the drop fraction where it
        decays)."""
        return {"drt/drop_fraction": self.config.drop_fraction_at(step)} if self.config.drop_decay else {}

    def after_step(self, model: Any, step: int) -> None:
        """Called last after every optimizer step (nothing by default)."""

    def updates_at(self, model: Any, step: int) -> bool:
        """Whether the mask moves after optimizer step ``step``: an update step whose trained values are all
        finite (a non-finite step is skipped with a warning: :func:`~drt_peft.masks.dynamic.trained_values_finite`)."""
        return self.config.is_update_step(step) and trained_values_finite(model, step)

    def _caps(self, layer: DRTLayer) -> tuple[int, int] | None:
        """The layer's ``(per_row, per_column)`` room under the config's line caps, None without caps."""
        config = self.config
        if config.max_row_density is None and config.max_column_density is None:
            return None
        shape = tuple(layer.op.to_matrix(layer.base_layer.weight).shape)
        return line_caps(shape, config.max_row_density, config.max_column_density)

    def require_single_process(self) -> None:
        """Refuse to run across processes: for methods that move d between layers (SNFS, DSR)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise RuntimeError(
                f"{type(self.config).__name__} moves trained entries between layers, which changes parameter sizes "
                "that DDP and FSDP fix when they wrap the model; run it in one process, or use SETConfig / RigLConfig"
            )

    def _mark_explored(self, i: int, indices: Tensor) -> None:
        bitmap = getattr(self, f"explored_{i}")
        byte, bit = torch.div(indices, 8, rounding_mode="floor"), indices % 8
        for b in range(8):
            chosen = byte[bit == b]  # distinct indices with the same bit lie in distinct bytes
            bitmap[chosen] |= 1 << b

    def _explored_count(self, i: int) -> int:
        """How many positions of the i-th layer were ever trained."""
        bitmap = getattr(self, f"explored_{i}")
        return sum(int(((bitmap >> bit) & 1).sum()) for bit in range(8))

    def statistics(self, model: Any) -> dict[str, float]:
        """``drt/itop_exploration``: the fraction of all targeted positions ever trained (Liu et al. 2021)."""
        sizes = [layer.base_layer.weight.numel() for _, layer in model.drt_layers()]
        if not sizes:
            return {}
        explored = sum(self._explored_count(i) for i in range(len(sizes)))
        return {"drt/itop_exploration": explored / sum(sizes)}


@dataclass(frozen=True)
class RewiringConfig(DRTConfig):
    """What every dynamic sparse training method shares (survey §6): a random mask to start, ψ rewired every
    ``update_frequency`` steps until ``t_end``, d exact. Each method adds its drop rule: a fraction of each
    layer (:class:`DynamicConfig`) or the sign crossings of DEEP-R."""

    criterion = random_scores

    budget: str = field(
        default="erk", metadata={"help": "As in DRTConfig; dynamic methods start from a random ERK mask by default."}
    )

    update_frequency: int = field(
        default=100, metadata={"help": "Fp: steps between mask updates (updates run at step = Fp, 2·Fp, ...)."}
    )
    t_end: int | None = field(
        default=None, metadata={"help": "Last step at which the mask may change (None: never stops)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("update_frequency", self.update_frequency)
        check_int("t_end", self.t_end, optional=True)
        if self.structure != "unstructured":
            raise ValueError(
                f"structure={self.structure!r} is not supported by {self.method_name!r}; "
                "dynamic methods use 'unstructured'"
            )

    def check_training_length(self, max_steps: int) -> None:
        if self.t_end is not None and self.t_end > max_steps:
            raise ValueError(
                f"t_end={self.t_end} is beyond the training length (max_steps={max_steps}); "
                f"set t_end <= {max_steps}, e.g. 75% of the steps as in RigL"
            )

    def rewiring_at(self, step: int) -> bool:
        """Whether the mask may still change at optimizer step ``step``: until ``t_end``, or always without it."""
        return self.t_end is None or step <= self.t_end

    def is_update_step(self, step: int) -> bool:
        """Whether the mask changes after optimizer step ``step``."""
        return step > 0 and step % self.update_frequency == 0 and self.rewiring_at(step)


@dataclass(frozen=True)
class DynamicConfig(RewiringConfig):
    """Dynamic sparse training that drops a fraction q of each layer's trained entries per update (SET, RigL,
    SNFS) or aims at that fraction (DSR); ψ changes every ``update_frequency`` steps, d stays exact."""

    #: How the drop fraction decays from α to 0 at ``t_end`` (:func:`~drt_peft.schedules.cosine_decay` in RigL and
    #: SNFS); then ``t_end`` is required. None: it stays α.
    drop_decay: ClassVar[Callable[[float, int, int], float] | None] = None
    policy: ClassVar[type[Policy]] = DropAndGrow

    drop_fraction: float = field(
        default=0.3, metadata={"help": "q: fraction of each layer's trained entries dropped and regrown per update."}
    )
    drop_criterion: str = field(
        default="magnitude",
        metadata={
            "help": "What the drop judges a trained entry by: 'magnitude', its weight ϑ (as the papers do); "
            "'change', ϑ − Θ(0), how far training moved it from its frozen value (an ablation for freeze mode)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.drop_fraction, (int, float)) or not 0 < self.drop_fraction < 1:
            raise ValueError(f"drop_fraction={self.drop_fraction!r} must satisfy 0 < drop_fraction < 1")
        check_choice("drop_criterion", self.drop_criterion, DROP_CRITERIA)
        if self.drop_criterion == "change" and self.mode != "freeze":
            raise ValueError(
                f"drop_criterion='change' is not supported with mode={self.mode!r}; it needs mode='freeze' (in prune "
                "mode the untrained entries are zero, so the change is ϑ itself: use 'magnitude')"
            )
        if self.drop_decay and self.t_end is None:
            decay = (self.drop_decay.__doc__ or self.drop_decay.__name__).split(":")[0]
            raise ValueError(
                f"t_end=None: {type(self).__name__}'s drop fraction decays to 0 at t_end ({decay}), so it needs the "
                "last update step (Evci et al. use 75% of the training steps)"
            )

    def drop_fraction_at(self, step: int) -> float:
        """q_t: ``drop_fraction``, or α = ``drop_fraction`` decayed by :attr:`drop_decay` at step t."""
        if self.drop_decay is None:
            return self.drop_fraction
        return self.drop_decay(self.drop_fraction, step, self.t_end)
