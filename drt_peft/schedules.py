"""Every schedule of the package: how a quantity moves over steps or rounds, as pure functions.

- :func:`cosine_decay` and :func:`linear_decay` — the drop fraction of dynamic sparse training (RigL and SNFS,
  Evci et al. 2020; SpIEL, Ansell et al. 2024);
- :func:`round_densities` — the densities of iterative pruning at initialisation (FORCE, SynFlow);
- :func:`lottery_rounds` and :func:`lottery_densities` — the rounds of iterative magnitude pruning
  (survey §4, eq. 18).
"""

from __future__ import annotations

import math

#: Round schedules of iterative pruning at initialisation.
ROUND_SCHEDULES = ("exponential", "linear")


def cosine_decay(initial: float, step: int, t_end: int) -> float:
    """α_t = α/2 · (1 + cos(π t / t_end)): from α at step 0 to 0 at ``t_end``."""
    return initial / 2 * (1 + math.cos(math.pi * step / t_end))


def linear_decay(initial: float, step: int, t_end: int) -> float:
    """α_t = α · (1 − t / t_end): from α at step 0 to 0 at ``t_end``."""
    return initial * (1 - step / t_end)


def round_densities(start: float, final: float, rounds: int, schedule: str) -> list[float]:
    """Densities of rounds r = 1..k from ``start`` to ``final``: ``"exponential"`` start·(final/start)^(r/k)
    or ``"linear"`` start − r(start − final)/k."""
    if schedule == "exponential":
        return [start * math.exp(math.log(final / start) * r / rounds) for r in range(1, rounds + 1)]
    if schedule == "linear":
        return [start - r * (start - final) / rounds for r in range(1, rounds + 1)]
    raise ValueError(f"schedule={schedule!r} is not supported; use one of {list(ROUND_SCHEDULES)}")


def lottery_rounds(density: float, prune_fraction: float, one_shot: bool = False) -> int:
    """Pruning rounds that take the density from 1 to ``density`` removing ``prune_fraction`` of the survivors
    each round: ⌈log(density) / log(1 − prune_fraction)⌉ (survey eq. 18), or 1 for one-shot pruning."""
    if one_shot or density >= 1:
        return 1
    return max(1, math.ceil(math.log(density) / math.log(1 - prune_fraction) - 1e-9))


def lottery_densities(density: float, prune_fraction: float, one_shot: bool = False) -> list[float]:
    """The density trained in each round of the search: 1 (dense), (1 − p), (1 − p)², …, ending at ``density``."""
    rounds = lottery_rounds(density, prune_fraction, one_shot)
    steps = [(1 - prune_fraction) ** r for r in range(1, rounds)]
    return [1.0, *[max(d, density) for d in steps], density]
