"""The checks every config field shares, so each rule is written once and every message has one shape:
the field, the value given and what is allowed."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any


def check_choice(name: str, value: Any, allowed: Collection[str]) -> None:
    """Refuse ``value`` unless it is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; use one of {list(allowed)}")


def check_int(name: str, value: Any, minimum: int = 1, optional: bool = False, hint: str = "") -> None:
    """Refuse anything but an integer >= ``minimum`` (``bool`` is not an integer here), or None when ``optional``."""
    if optional and value is None:
        return
    if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
        return
    allowed = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    raise ValueError(f"{name}={value!r} must be {allowed}{' or None' if optional else ''}{hint}")
