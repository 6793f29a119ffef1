"""Θ(0) of the targeted weights: seeded re-initialisation, and the fingerprint and probe checked on load.

Two records identify the base an adapter was made on. :func:`fingerprint` is an exact SHA-256 of
the targeted weights' bytes, so it changes with their dtype. :class:`BaseProbe` is a small
summary (per layer a few dozen values at seeded positions and three float64 sums) that the same
weights keep, within rounding, in any floating dtype: an adapter trained on a float32 base then
also loads on its bfloat16 or float16 copy. An exact hash of rounded values cannot do this (a
float32 value rounded to bfloat16 and to float16 gives two values that round differently again).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from .seeding import generator
from .targeting import Target

#: How ``base_init="seeded"`` draws Θ(0) (see :func:`seeded_init_`).
WEIGHT_INITS = ("model", "signed_constant")


def seeded_init_(targets: Sequence[Target], model: nn.Module, seed: int, weight_init: str = "model") -> None:
    """Re-initialise each target's weight from ``(seed, name)``, by default as the model's own init would.

    ``weight_init="model"``: transformers models with ``config.initializer_range`` draw
    N(0, initializer_range²) (their ``_init_weights`` convention); transformers' ``Conv1D`` draws
    N(0, 0.02²) (its own init); other modules use PyTorch's default ``kaiming_uniform_(a=√5)``.
    ``"signed_constant"``: every entry is ±σ with a random sign, σ = gain/√fan_in, gain = √2 (ReLU),
    fan_in from the weight's ``[out, fan_in]`` view: the "signed Kaiming constant" of Ramanujan et al.
    2020 (their code's ``--init signed_constant``, mode fan_in, nonlinearity relu). Draws happen in
    float32 on a CPU generator, so the frozen values are regenerable from the 32-bit seed on any device
    (survey eqs. 21-22).
    """
    if weight_init not in WEIGHT_INITS:
        raise ValueError(f"weight_init={weight_init!r} is not supported; use one of {list(WEIGHT_INITS)}")
    std = getattr(getattr(model, "config", None), "initializer_range", None)
    for target in targets:
        values = torch.empty(target.weight.shape, dtype=torch.float32)
        g = generator(seed, "init", target.name)
        if weight_init == "signed_constant":
            sigma = nn.init.calculate_gain("relu") / math.sqrt(target.op.to_matrix(values).shape[1])
            values = torch.where(torch.rand(values.shape, generator=g) < 0.5, -sigma, sigma)
        elif std is not None:
            nn.init.normal_(values, 0.0, std, generator=g)
        elif isinstance(target.module, Conv1D):
            nn.init.normal_(values, 0.0, 0.02, generator=g)
        else:
            nn.init.kaiming_uniform_(values, a=math.sqrt(5), generator=g)
        with torch.no_grad():
            target.weight.copy_(values)


def fingerprint(targets: Sequence[Target]) -> str:
    """SHA-256 over the targets' names, shapes, dtypes and weight bytes (``"sha256:<hex>"``)."""
    digest = hashlib.sha256()
    for target in targets:
        weight = target.weight.detach().cpu().contiguous()
        digest.update(f"{target.name}|{tuple(weight.shape)}|{weight.dtype}\n".encode())
        digest.update(weight.reshape(-1).view(torch.uint8).numpy())
    return "sha256:" + digest.hexdigest()


#: Values of each targeted weight recorded by :class:`BaseProbe`, at positions drawn from the seed.
PROBE_SIZE = 32
#: Bytes the probe adds to an adapter file per targeted layer, at most: 32 float32 values, three float64
#: sums, an int64 count and a dtype name (plus, once per file, about 300 bytes of safetensors header).
PROBE_BYTES_PER_LAYER = 200

_PROBE_KEYS = ("drt_base_probe_numels", "drt_base_probe_stats", "drt_base_probe_values")
_PROBE_DTYPES_KEY = "drt_base_probe_dtypes"
#: Relative slack for float64 sums of the same values reduced in another order (another device or kernel).
_SUMMATION = 1e-10


def _rounding(dtype: torch.dtype) -> tuple[float, float]:
    """``(relative, absolute)`` bounds, twice the rounding error of a value stored in ``dtype``.

    Rounding to nearest changes a normal value by at most eps/2 of its magnitude and a subnormal
    one by at most half the subnormal spacing tiny·eps; exact (non-floating) dtypes round nothing.
    """
    if not dtype.is_floating_point:
        return 0.0, 0.0
    info = torch.finfo(dtype)
    return info.eps, info.tiny * info.eps


@dataclass(frozen=True)
class BaseProbe:
    """A dtype-independent summary of the targeted Θ(0), compared when the dtypes of two bases differ.

    Per targeted weight, in target order: its dtype and number of entries D_l, float64 ``stats``
    (Σx, Σ|x|, Σx²) and float64 ``values`` at :data:`PROBE_SIZE` positions drawn from
    ``generator(seed, "base-probe", name)``. :meth:`mismatch` compares two probes within the
    rounding of both dtypes, so the same weights in float32, bfloat16, float16 or float64 agree,
    and other weights (another initialisation, another checkpoint) do not. It is computed one
    layer at a time and stored in the adapter file (:meth:`to_tensors`), at most
    :data:`PROBE_BYTES_PER_LAYER` bytes per layer.
    """

    dtypes: tuple[torch.dtype, ...]
    numels: Tensor
    stats: Tensor
    values: Tensor

    @classmethod
    def of(cls, targets: Sequence[Target], seed: int) -> BaseProbe:
        """The probe of ``targets``' current weights (positions from ``seed``)."""
        numels, stats, values = [], [], []
        for target in targets:
            flat = target.weight.detach().reshape(-1)
            numels.append(flat.numel())
            if not flat.numel():
                stats.append(torch.zeros(3, dtype=torch.float64))
                values.append(torch.zeros(PROBE_SIZE, dtype=torch.float64))
                continue
            g = generator(seed, "base-probe", target.name)
            positions = torch.randint(0, flat.numel(), (PROBE_SIZE,), generator=g)
            values.append(flat[positions.to(flat.device)].double().cpu())
            sums = (
                flat.sum(dtype=torch.float64),
                torch.linalg.vector_norm(flat, 1, dtype=torch.float64),
                torch.linalg.vector_norm(flat, 2, dtype=torch.float64) ** 2,
            )
            stats.append(torch.stack(sums).cpu())
        return cls(
            dtypes=tuple(target.weight.dtype for target in targets),
            numels=torch.tensor(numels, dtype=torch.int64),
            stats=torch.stack(stats) if stats else torch.zeros(0, 3, dtype=torch.float64),
            values=torch.stack(values) if values else torch.zeros(0, PROBE_SIZE, dtype=torch.float64),
        )

    def to_tensors(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        """Tensors and metadata (the dtype names) for the adapter file.

        The probed values are stored in float32 unless a weight is float64 (they are then exact either way).
        """
        wide = any(dtype.is_floating_point and torch.finfo(dtype).bits > 32 for dtype in self.dtypes)
        values = self.values if wide else self.values.float()
        tensors = dict(zip(_PROBE_KEYS, (self.numels, self.stats, values), strict=True))
        names = [str(dtype).removeprefix("torch.") for dtype in self.dtypes]
        return tensors, {_PROBE_DTYPES_KEY: json.dumps(names)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], metadata: dict[str, str]) -> BaseProbe | None:
        """The probe stored by :meth:`to_tensors`, or None for adapters saved without one."""
        if not all(key in tensors for key in _PROBE_KEYS) or _PROBE_DTYPES_KEY not in metadata:
            return None
        dtypes = []
        for name in json.loads(metadata[_PROBE_DTYPES_KEY]):
            dtype = getattr(torch, name, None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"{_PROBE_DTYPES_KEY} names dtype {name!r}, which this torch does not know")
            dtypes.append(dtype)
        numels, stats, values = (tensors[key] for key in _PROBE_KEYS)
        return cls(tuple(dtypes), numels, stats.double(), values.double())

    def same_dtypes(self, other: BaseProbe) -> bool:
        """Whether every layer has the same dtype in both probes (then the exact fingerprint decides)."""
        return self.dtypes == other.dtypes

    def mismatch(self, other: BaseProbe, names: Sequence[str]) -> str | None:
        """Why ``other`` (the candidate base, layers ``names``) is not the base of ``self``, or None.

        Per layer, with r = eps_a + eps_b and t = tiny_a·eps_a + tiny_b·eps_b (twice the rounding
        of either dtype, so a value rounded into both from a third dtype still agrees):
        every probed value within r·|x| + t, Σx within r·Σ|x| + D·t, Σ|x| likewise, and Σx² within
        2r·(Σx²_a + Σx²_b) + t·(Σ|x|_a + Σ|x|_b); the sums also allow a relative 1e-10 for the order
        in which float64 reductions add.
        """
        if len(self.dtypes) != len(other.dtypes) or len(names) != len(other.dtypes):
            return f"the adapter's base has {len(self.dtypes)} targeted weights, this model {len(other.dtypes)}"
        for i, name in enumerate(names):
            a_dtype, b_dtype = self.dtypes[i], other.dtypes[i]
            if int(self.numels[i]) != int(other.numels[i]):
                return f"{name} has {int(other.numels[i])} entries, the adapter's base {int(self.numels[i])}"
            (ra, ta), (rb, tb) = _rounding(a_dtype), _rounding(b_dtype)
            rel, absolute = ra + rb, ta + tb
            a, b = self.values[i], other.values[i]
            bound = rel * torch.maximum(a.abs(), b.abs()) + absolute
            off = ~(((a - b).abs() <= bound) | (a == b))
            if bool(off.any()):
                j = int(off.nonzero()[0])
                return (
                    f"{name} has the probed value {float(b[j])!r} ({b_dtype}) where the adapter's base has "
                    f"{float(a[j])!r} ({a_dtype}); rounding between these dtypes allows {float(bound[j]):.3g}"
                )
            (sum_a, abs_a, sq_a), (sum_b, abs_b, sq_b) = self.stats[i].tolist(), other.stats[i].tolist()
            d = int(self.numels[i])
            # _SUMMATION: float64 sums of the same values taken in another order or on another device
            largest = max(abs_a, abs_b)
            linear = (rel + _SUMMATION) * largest + d * absolute
            checks = (
                ("sum", sum_a, sum_b, linear),
                ("sum of absolute values", abs_a, abs_b, linear),
                ("sum of squares", sq_a, sq_b, (2 * rel + _SUMMATION) * (sq_a + sq_b) + absolute * (abs_a + abs_b)),
            )
            for what, x, y, tolerance in checks:
                if not (abs(x - y) <= tolerance or x == y):
                    return (
                        f"{name} has a {what} of {y!r} ({b_dtype}) where the adapter's base has {x!r} ({a_dtype}); "
                        f"rounding between these dtypes allows {tolerance:.3g}"
                    )
        return None
