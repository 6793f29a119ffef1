"""Seeds for every random choice, derived from the config's one seed.

Each random draw gets its own CPU ``torch.Generator`` seeded from ``(seed, purpose, name)``, so a
layer's draw does not depend on which other layers are targeted or on their order, and every
process and device draws the same numbers.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, purpose: str, name: str) -> int:
    """A 63-bit seed for one ``purpose`` (e.g. ``"scores"``) and one module ``name``."""
    digest = hashlib.sha256(f"{seed}\x00{purpose}\x00{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generator(seed: int, purpose: str, name: str) -> torch.Generator:
    """A CPU generator seeded with :func:`derive_seed`."""
    return torch.Generator(device="cpu").manual_seed(derive_seed(seed, purpose, name))
