"""Criteria (survey §3.4): score functions whose largest scores select ψ. Importing this package
registers them all."""

from . import basic, fisher, gradient, synflow

__all__ = ["basic", "fisher", "gradient", "synflow"]
