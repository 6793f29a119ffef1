"""Criteria (survey §3.4): score functions whose largest scores select ψ, named by reference in each
method's config."""

from . import basic, fisher, gradient, synflow

__all__ = ["basic", "fisher", "gradient", "synflow"]
