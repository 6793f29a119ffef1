"""One short file per method: a registered config naming its criterion (and, for dynamic
methods, its update policy)."""

from .magnitude import MagnitudeConfig
from .random import RandomConfig

__all__ = ["MagnitudeConfig", "RandomConfig"]
