"""Which modules a config embeds (``target_modules``) and trains in full (``modules_to_save``)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from .layer import SUPPORTED_TYPES, WeightOp

_LINEAR_TYPES = (nn.Linear, Conv1D)


#: Normalisation layers recognised by type (subclasses included); others by a class name ending in "Norm".
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)


def is_normalisation(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer: an instance of :data:`NORM_TYPES` or of a class whose name ends
    in ``"Norm"`` (transformers' ``LlamaRMSNorm``, ``T5LayerNorm``, ...)."""
    return isinstance(module, NORM_TYPES) or type(module).__name__.endswith("Norm")


def tied_aliases(model: nn.Module, prefix: str = "") -> dict[str, str]:
    """``{alias: kept}`` state-dict keys of parameters shared under several names (tied embeddings)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in model.named_parameters(prefix=prefix, remove_duplicate=False):
        kept = first.setdefault(id(param), name)
        if kept != name:
            aliases[name] = kept
    return aliases


@dataclass(frozen=True)
class Target:
    """A targeted module: its name in the model, the module and its :class:`WeightOp`."""

    name: str
    module: nn.Module
    op: WeightOp

    @property
    def weight(self) -> Tensor:
        return self.module.weight


def _matches(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def _head_names(model: nn.Module) -> set[str]:
    """Modules outside a transformers model's backbone (task heads) and its output embeddings."""
    if not isinstance(model, PreTrainedModel):
        return set()
    heads: set[str] = set()
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and getattr(model, prefix, None) is not None:
        heads.update(name for name, child in model.named_children() if name != prefix)
    output = model.get_output_embeddings()
    if output is not None:
        heads.update(name for name, module in model.named_modules() if module is output)
    return heads


def _under(name: str, roots: set[str]) -> bool:
    return any(name == root or name.startswith(root + ".") for root in roots)


def find_modules_to_save(model: nn.Module, names: Sequence[str] | None) -> list[str]:
    """Full names of the modules that ``modules_to_save`` entries match (outermost only)."""
    if not names:
        return []
    found: list[str] = []
    for entry in names:
        hits = [n for n, _ in model.named_modules() if n and _matches(n, entry)]
        if not hits:
            raise ValueError(f"modules_to_save entry {entry!r} matches no module of {type(model).__name__}")
        found.extend(hits)
    unique = set(found)
    return sorted(n for n in unique if not _under(n, unique - {n}))


def find_targets(model: nn.Module, target_modules: list[str] | str, exclude: Sequence[str] = ()) -> list[str]:
    """Names of the modules to embed, in model order; raises if nothing matches."""
    excluded = set(exclude)
    if target_modules == "all-linear":
        excluded |= _head_names(model)
        names = [n for n, m in model.named_modules() if isinstance(m, _LINEAR_TYPES) and type(m) in SUPPORTED_TYPES]
    elif isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        names = [n for n, _ in model.named_modules() if n and pattern.fullmatch(n)]
    else:
        names = [n for n, _ in model.named_modules() if n and any(_matches(n, e) for e in target_modules)]
    names = [n for n in names if not _under(n, excluded)]
    modules = dict(model.named_modules())
    unsupported = [f"{n} ({type(modules[n]).__name__})" for n in names if type(modules[n]) not in SUPPORTED_TYPES]
    if unsupported:
        allowed = ", ".join(t.__name__ for t in SUPPORTED_TYPES)
        raise ValueError(
            f"target_modules={target_modules!r} matches unsupported modules {unsupported[:5]}; allowed types: {allowed}"
        )
    if not names:
        candidates = [n for n, m in model.named_modules() if type(m) in SUPPORTED_TYPES][:8]
        raise ValueError(
            f"target_modules={target_modules!r} matches no module of {type(model).__name__} "
            f"(excluding the output head and modules_to_save); supported modules include {candidates}"
        )
    return names


def skipped_linear_modules(model: nn.Module) -> list[str]:
    """Linear modules that ``"all-linear"`` leaves out because their type cannot be embedded (``nn.Linear``
    subclasses such as quantized layers), with their type: ``"name (Type)"``."""
    heads = _head_names(model)
    return [
        f"{name} ({type(module).__name__})"
        for name, module in model.named_modules()
        if isinstance(module, _LINEAR_TYPES) and type(module) not in SUPPORTED_TYPES and not _under(name, heads)
    ]
