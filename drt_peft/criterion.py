"""What a criterion is (survey §3.4): a named score function whose largest scores select ψ.

A leaf, so that configs can name their criterion by reference while the criteria themselves
(:mod:`drt_peft.masks.criteria`) sit above the configs they read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

#: ``fn(scoring) -> list of weight-shaped scores``, one per target; ``scoring`` is a
#: :class:`~drt_peft.masks.ScoringContext`.
ScoreFunction = Callable[[Any], list[Tensor]]


@dataclass(frozen=True)
class Criterion:
    """A score function and the name its messages use; the largest scores select ψ.

    A method's config names its criterion by reference (``criterion = snip_scores``); make one
    with the :func:`criterion` decorator.
    """

    name: str
    scores: ScoreFunction

    def __call__(self, scoring: Any) -> list[Tensor]:
        return self.scores(scoring)


def criterion(name: str) -> Callable[[ScoreFunction], Criterion]:
    """Decorator: make ``fn(scoring) -> list of weight-shaped scores`` a :class:`Criterion` called ``name``."""

    def wrap(fn: ScoreFunction) -> Criterion:
        return Criterion(name, fn)

    return wrap
