"""Configuration of a DRT adapter: which weights train, how many, and what the rest become.

Every method implements the survey's embedding (Wimmer et al., survey §2.2, eq. 7; docs/concepts.md)

    Θ = ψ·ϑ + χ·Θ(0)

and differs only in the policy that chooses ψ. :class:`DRTConfig` holds the choices shared by
all methods (survey §3: density, budget, structure, mode of the untrained entries); each method
is a small registered subclass, so ``adapter_config.json`` names its method and round-trips
through :meth:`DRTConfig.from_pretrained`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from .criterion import Criterion
from .files import atomic_write_bytes, resolve_file
from .policy import Policy
from .validation import check_choice, check_int

if TYPE_CHECKING:
    from torch import nn


CONFIG_NAME = "adapter_config.json"

#: Written as ``peft_type`` into ``adapter_config.json``. transformers takes any folder with an
#: ``adapter_config.json`` for a PEFT adapter (``AutoModel*.from_pretrained(folder)``,
#: ``model.load_adapter(folder)``) and PEFT looks its ``peft_type`` up among its methods; this value
#: is no PEFT method, so those calls stop with a ``KeyError`` that reads as this sentence.
PEFT_TYPE = (
    "drt_peft adapter, not a PEFT one: load it with drt_peft.DRTModel.from_pretrained(base_model, folder_or_repo_id)"
)

MODES = ("freeze", "prune")
BASE_INITS = ("pretrained", "seeded")
BUDGETS = ("global", "uniform", "erk")
SCORE_NORMALISATIONS = ("none", "layer")
BIASES = ("none", "all")
_NM_PATTERN = re.compile(r"^(\d+):(\d+)$")

_METHODS: dict[str, type[DRTConfig]] = {}

C = TypeVar("C", bound="DRTConfig")


@dataclass(frozen=True)
class Paper:
    """A paper to cite: ``Paper("Lee, Ajanthan & Torr", "SNIP: ...", "ICLR", 2019)``."""

    authors: str
    title: str
    venue: str
    year: int

    def __str__(self) -> str:
        return f"{self.authors}, “{self.title}”, {self.venue} {self.year}"

    def markdown(self) -> str:
        return f"{self.authors}, *{self.title}*, {self.venue} {self.year}"


#: The survey whose embedding Θ = ψ·ϑ + χ·Θ(0) every method implements.
SURVEY = Paper(
    "Wimmer, Mehnert & Condurache",
    "Dimensionality Reduced Training by Pruning and Freezing Parts of a Deep Neural Network, a Survey",
    "Artificial Intelligence Review",
    2023,
)


def setting(**fields: Any) -> Mapping[str, Any]:
    """Fields and their values as a read-only mapping: a method's :attr:`DRTConfig.paper_setting`."""
    return MappingProxyType(fields)


def register_method(name: str):
    """Class decorator: register a :class:`DRTConfig` subclass under the method ``name``."""

    def wrap(cls: type[C]) -> type[C]:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered by {_METHODS[name].__name__}")
        _check_method_class(cls)
        cls.method_name = name
        _METHODS[name] = cls
        return cls

    return wrap


def _check_method_class(cls: type) -> None:
    """A method config is its own frozen dataclass whose ``criterion`` (a :class:`~drt_peft.criterion.Criterion` or
    None) and ``policy`` (a :class:`~drt_peft.policy.Policy` subclass) are class attributes, not fields."""
    if "__dataclass_fields__" not in cls.__dict__:
        raise TypeError(f"{cls.__name__}: declare a method config with @dataclass(frozen=True), or its fields are lost")
    fields = {f.name for f in dataclasses.fields(cls)} & {"criterion", "policy"}
    if fields:
        raise TypeError(
            f"{cls.__name__}: {sorted(fields)} are class attributes, not fields; assign them without a type annotation"
        )
    chosen = cls.__dict__.get("criterion")
    if "criterion" in cls.__dict__ and not (chosen is None or isinstance(chosen, (Criterion, property))):
        raise TypeError(
            f"{cls.__name__}.criterion={chosen!r}: name the criterion by reference, a Criterion made with the "
            "drt_peft.masks.criterion decorator (e.g. drt_peft.masks.criteria.gradient.snip_scores)"
        )
    if not (isinstance(cls.policy, type) and issubclass(cls.policy, Policy)):
        raise TypeError(f"{cls.__name__}.policy={cls.policy!r} must be a subclass of drt_peft.policy.Policy")
    setting = cls.__dict__.get("paper_setting")
    if setting is not None:
        unknown = sorted(set(setting) - {f.name for f in dataclasses.fields(cls)})
        if not isinstance(setting, Mapping) or unknown:
            raise TypeError(
                f"{cls.__name__}.paper_setting={setting!r} must map fields of {cls.__name__} to values"
                + (f"; {unknown} are not fields" if unknown else "")
            )


def available_methods() -> list[str]:
    """Names of all registered methods."""
    return sorted(_METHODS)


def config_class(method: str) -> type[DRTConfig]:
    """The config class registered for ``method``."""
    try:
        return _METHODS[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; registered methods: {available_methods()}") from None


def parse_structure(structure: str) -> tuple[int, int] | str:
    """``"unstructured"`` / ``"rows"`` unchanged, or ``(N, M)`` for an ``"N:M"`` string."""
    if structure in ("unstructured", "rows"):
        return structure
    match = _NM_PATTERN.match(structure) if isinstance(structure, str) else None
    if match is None:
        raise ValueError(
            f"structure={structure!r} is not supported; use 'unstructured', 'rows' or an N:M string such as '2:4'"
        )
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n <= m:
        raise ValueError(
            f"structure={structure!r}: N:M needs 0 < N <= M (at most N trained entries in each block of M)"
        )
    return n, m


@dataclass(frozen=True)
class DRTConfig:
    """Shared fields of every DRT method (survey §3). Use a method's subclass, e.g. ``RandomConfig``.

    A config is data: frozen (change a copy with ``dataclasses.replace``), compared by value and
    stored as JSON. What the method does is its :attr:`policy`, built and owned by ``DRTModel``.
    """

    method_name: ClassVar[str] = ""
    #: The paper that introduced the method, cited in the model card (the survey for methods without one).
    paper: ClassVar[Paper] = SURVEY
    #: The criterion (survey §3.4) that scores entries, by reference; the selected ψ keeps the largest scores.
    #: None for methods that select no entries (their layers replace ψ, or they train no weight entry).
    criterion: ClassVar[Criterion | None] = None
    #: The behaviour of the method (:class:`~drt_peft.policy.Policy`): its layers and its per-step policy.
    policy: ClassVar[type[Policy]] = Policy
    #: True when ψ is a function of the seed and the layer shapes alone, so checkpoints omit indices.
    indices_from_seed: ClassVar[bool] = False
    #: True when ϑ is never trained away from Θ(0) at ψ (supermasks), so checkpoints omit the values.
    values_from_base: ClassVar[bool] = False
    #: False when the method itself fixes what trains (norm/bias-only, fixed classifier): ``density``
    #: and ``num_trainable`` then have no meaning and must stay unset.
    sized_by_density: ClassVar[bool] = True
    #: The fields the method's paper fixes where they differ from the defaults (or are worth stating), e.g.
    #: ``{"budget": "global", "mode": "prune"}``: what :meth:`as_in_paper` applies. Read from the class itself,
    #: never inherited: None (the default) when no paper setting is recorded, and the method's page says why.
    paper_setting: ClassVar[Mapping[str, Any] | None] = None
    #: False for methods whose ψ follows rules of their own during training that do not keep ``max_row_density``
    #: and ``max_column_density`` (a supermask's trained scores): the caps are refused there. The selection from
    #: scores and drop-and-grow's regrowth keep them.
    honours_line_caps: ClassVar[bool] = True

    density: float | None = field(
        default=None,
        metadata={
            "help": "Fraction d/D of the targeted weights that train, 0 < density <= 1. "
            "Exactly one of `density` and `num_trainable` must be set."
        },
    )
    num_trainable: int | None = field(
        default=None,
        metadata={"help": "Total number d of trained weight entries over all targeted layers (instead of `density`)."},
    )
    mode: str = field(
        default="freeze",
        metadata={
            "help": "What the untrained entries become: 'freeze' keeps them at Θ(0) (the base values), "
            "'prune' sets them to zero (a sparse model)."
        },
    )
    base_init: str = field(
        default="pretrained",
        metadata={
            "help": "Θ(0) of the targeted weights: 'pretrained' keeps the base model's values; 'seeded' "
            "re-initialises them from `seed` as the model's own init would, so they are regenerable "
            "from 32 bits (survey eqs. 21-22)."
        },
    )
    budget: str = field(
        default="uniform",
        metadata={
            "help": "How d is spread over layers (survey §3.2): 'uniform' (same density per layer), "
            "'global' (one threshold over all layers), 'erk' (Erdős–Rényi-Kernel, Evci et al. 2020)."
        },
    )
    score_normalisation: str = field(
        default="none",
        metadata={
            "help": "With budget='global': 'layer' divides each layer's scores by their mean absolute value before "
            "the one ranking over all layers, so a layer wins entries by how far they stand out within it, not by "
            "how loud its gradients are; 'none' ranks the raw scores."
        },
    )
    max_row_density: float | None = field(
        default=None,
        metadata={
            "help": "At most this fraction of any output row of a layer trains, rounded down but at least one entry "
            "(0 < value <= 1; None: no cap). The entries a full row cannot take go to the next-best entries "
            "elsewhere in the layer (elsewhere in the model with budget='global'), so d stays exact. Unstructured "
            "masks only."
        },
    )
    max_column_density: float | None = field(
        default=None,
        metadata={
            "help": "At most this fraction of any input column of a layer (its [out, fan_in] view) trains, as "
            "max_row_density for rows (None: no cap)."
        },
    )
    structure: str = field(
        default="unstructured",
        metadata={
            "help": "Granularity of ψ (survey §3.1): 'unstructured', 'rows' (whole output rows / neurons / "
            "channels), or 'N:M' such as '2:4' (at most N trained entries in each block of M inputs)."
        },
    )
    target_modules: tuple[str, ...] | str | None = field(
        default="all-linear",
        metadata={
            "help": "Modules whose weight is embedded: a list of names, stored as a tuple (a name matches itself or "
            "any module whose name ends with '.name'), a regular expression matched against the full module name, or "
            "'all-linear' for every Linear/Conv1D layer except the output head. Supported types: "
            "nn.Linear, transformers' Conv1D, nn.Conv2d."
        },
    )
    modules_to_save: tuple[str, ...] | None = field(
        default=None,
        metadata={
            "help": "Modules trained in full and stored in the adapter, e.g. a new classifier head: a list of "
            "names (stored as a tuple) or one name."
        },
    )
    bias: str = field(
        default="none",
        metadata={"help": "'none': biases stay frozen; 'all': the biases of targeted layers train too."},
    )
    seed: int = field(
        default=0,
        metadata={"help": "Seed of every random choice (random scores, seeded init); 0 <= seed < 2**32."},
    )
    base_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Name or path of the base model; filled in by `get_drt_model`."}
    )
    revision: str | None = field(default=None, metadata={"help": "Revision of the base model, if known."})
    base_model_fingerprint: str | None = field(
        default=None,
        metadata={
            "help": "Hash of the targeted base weights Θ(0); filled in by `get_drt_model` and checked on load "
            "so an adapter never lands on a different base."
        },
    )
    inference_mode: bool = field(default=False, metadata={"help": "Whether the adapter is loaded for inference."})
    autocast_adapter_dtype: bool = field(
        default=True,
        metadata={
            "help": "On a float16/bfloat16 base, store the tensors the DRT layers train (`drt_values`, supermask "
            "scores, the projection's ϑ) in float32 and cast them to the weight's dtype where they are used, so "
            "optimizer updates and states keep their precision (as PEFT's `autocast_adapter_dtype`). False keeps "
            "them in the base weight's dtype. The frozen base values stay in the weight's dtype either way."
        },
    )

    def __post_init__(self) -> None:
        if type(self) is DRTConfig or not self.method_name:
            raise TypeError(f"DRTConfig is abstract; use a method config: {available_methods()}")
        self._check_size()
        check_choice("mode", self.mode, MODES)
        check_choice("base_init", self.base_init, BASE_INITS)
        check_choice("budget", self.budget, BUDGETS)
        check_choice("bias", self.bias, BIASES)
        parse_structure(self.structure)
        self._check_concentration()
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed={self.seed!r} must be an integer with 0 <= seed < 2**32")
        self._check_modules()
        for flag in ("inference_mode", "autocast_adapter_dtype"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag}={getattr(self, flag)!r} must be True or False")

    def _check_size(self) -> None:
        """Exactly one of ``density`` and ``num_trainable`` (neither for methods that decide what trains)."""
        if not self.sized_by_density:
            if self.density is not None or self.num_trainable is not None:
                raise ValueError(
                    f"density={self.density!r}, num_trainable={self.num_trainable!r}: {self.method_name!r} decides "
                    "itself what trains, so neither applies; leave both unset (None)"
                )
        elif (self.density is None) == (self.num_trainable is None):
            raise ValueError(
                f"set exactly one of density and num_trainable (got density={self.density!r}, "
                f"num_trainable={self.num_trainable!r})"
            )
        if self.density is not None and not (
            isinstance(self.density, (int, float)) and not isinstance(self.density, bool) and 0 < self.density <= 1
        ):
            raise ValueError(f"density={self.density!r} is out of range; it must satisfy 0 < density <= 1")
        check_int("num_trainable", self.num_trainable, optional=True)

    def _check_concentration(self) -> None:
        """``score_normalisation`` acts on a global ranking only; the caps are fractions in (0, 1] of unstructured
        masks whose method keeps them (:attr:`honours_line_caps`)."""
        check_choice("score_normalisation", self.score_normalisation, SCORE_NORMALISATIONS)
        if self.score_normalisation != "none" and self.budget != "global":
            raise ValueError(
                f"score_normalisation={self.score_normalisation!r} is not supported with budget={self.budget!r}: it "
                "rescales each layer's scores, which changes only a ranking over all layers; use budget='global', "
                "or score_normalisation='none'"
            )
        for name in ("max_row_density", "max_column_density"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ValueError(f"{name}={value!r} must be a fraction with 0 < {name} <= 1, or None (no cap)")
            if self.structure != "unstructured":
                raise ValueError(
                    f"{name}={value!r} is not supported with structure={self.structure!r}; the caps apply to "
                    "structure='unstructured'"
                )
            if self.criterion is None or not self.honours_line_caps:
                raise ValueError(
                    f"{name}={value!r} is not supported by {self.method_name!r}: its ψ is not (only) the selection "
                    "from scores or the regrowth that the caps constrain; leave it None"
                )

    def _check_modules(self) -> None:
        """``target_modules`` is ``"all-linear"``, a valid regular expression or a list of names (stored as a tuple),
        and ``modules_to_save`` names (one, or a list stored as a tuple) or None."""
        if self.target_modules is None:
            raise ValueError("target_modules=None: name the modules to embed, or use 'all-linear'")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            try:
                re.compile(self.target_modules)
            except re.error as err:
                raise ValueError(
                    f"target_modules={self.target_modules!r} is not a valid regular expression: {err}"
                ) from None
        elif not isinstance(self.target_modules, str):
            names = tuple(self.target_modules)
            if not names or not all(isinstance(t, str) for t in names):
                raise ValueError(f"target_modules={self.target_modules!r} must be a non-empty list of module names")
            self._normalise("target_modules", names)
        if self.modules_to_save is not None:
            names = (self.modules_to_save,) if isinstance(self.modules_to_save, str) else tuple(self.modules_to_save)
            if not all(isinstance(name, str) for name in names):
                raise ValueError(f"modules_to_save={self.modules_to_save!r} must be module names (strings)")
            self._normalise("modules_to_save", names)

    def _normalise(self, name: str, value: Any) -> None:
        """Store the canonical form of a field while ``__post_init__`` validates it (the config is frozen after)."""
        object.__setattr__(self, name, value)

    def allow_only(self, reason: str, **allowed: str | tuple[str, ...]) -> None:
        """Refuse shared fields this method cannot honour: ``field=value`` (or a tuple of values) each."""
        for name, values in allowed.items():
            values = values if isinstance(values, tuple) else (values,)
            value = getattr(self, name)
            if value not in values:
                choices = " or ".join(repr(v) for v in values)
                raise ValueError(f"{name}={value!r} is not supported by {self.method_name!r}; use {choices}: {reason}")

    @classmethod
    def as_in_paper(cls: type[C], **fields: Any) -> C:
        """The config with the setting of the method's paper (:attr:`paper_setting`), the given fields on top.

        The defaults suit fine-tuning a pretrained model, which the papers do not do; this is the paper's
        setting, e.g. ``SNIPConfig.as_in_paper(density=0.05)`` is ``SNIPConfig(density=0.05, budget="global",
        mode="prune", num_batches=1)``. ``fields`` (the size, ``target_modules``, ...) are applied after the
        setting, so one given here wins. The result is an ordinary config, equal to the one written out.
        """
        setting = cls.__dict__.get("paper_setting")
        if setting is None:
            recorded = sorted(c.__name__ for c in _METHODS.values() if c.__dict__.get("paper_setting") is not None)
            raise NotImplementedError(
                f"{cls.__name__} records no paper setting (its page in docs/methods/ says why); set the fields "
                f"yourself. Configs with one: {recorded}"
            )
        return cls(**{**setting, **fields})

    @property
    def seeded_weight_init(self) -> str:
        """How ``base_init="seeded"`` draws Θ(0) (:func:`drt_peft.base_weights.seeded_init_`): ``"model"``, the
        model's own initialisation; methods with a choice override this (the supermask's ``weight_init``)."""
        return "model"

    @property
    def head_warmup(self) -> tuple[int, float]:
        """``(steps, learning rate)`` of the warm-up that trains only the ``modules_to_save`` on the calibration
        data before the criterion scores (:func:`drt_peft.masks.warmup.head_warmed_up`); ``(0, 0.0)``, none, here.
        Data-driven configs set it with ``warmup_steps`` and ``warmup_lr``."""
        return 0, 0.0

    @property
    def stores_indices(self) -> bool:
        """Whether checkpoints store ψ: the method selects entries (it has a criterion) and ψ is not a
        function of the seed alone (:attr:`indices_from_seed`)."""
        return self.criterion is not None and not self.indices_from_seed

    def modules_to_save_for(self, model: nn.Module) -> list[str] | None:
        """The ``modules_to_save`` entries for ``model``, resolved when the ``DRTModel`` is built or loaded.

        The field itself by default. Methods that train whole modules of their own choosing (the
        normalisation layers of ``NormBiasConfig``) add their full names here once they see the model;
        these are then trained in full, stored in the adapter and restored by ``unload()`` like any
        ``modules_to_save``.
        """
        return self.modules_to_save

    def check_training_length(self, max_steps: int) -> None:
        """Refuse settings that do not fit a run of ``max_steps`` optimizer steps (none by default)."""

    @property
    def nm(self) -> tuple[int, int] | None:
        """``(N, M)`` when ``structure`` is an N:M pattern, else None."""
        parsed = parse_structure(self.structure)
        return parsed if isinstance(parsed, tuple) else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples as lists), with the method name first."""
        fields = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        return {"method": self.method_name, **fields}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], source: str = "config") -> C:
        """Build the registered config that ``data["method"]`` names; ``cls`` must be it or an ancestor.

        A ``peft_type`` key (what :meth:`save_pretrained` writes for transformers and PEFT) is accepted
        and ignored; files written before it existed have none.
        """
        data = dict(data)
        method = data.pop("method", None)
        peft_type = data.pop("peft_type", None)  # written for transformers and PEFT (see PEFT_TYPE)
        if method is None and peft_type is not None:
            raise ValueError(
                f"{source} is a PEFT adapter (peft_type={peft_type!r}), not a drt_peft one; load it with "
                "peft.PeftModel.from_pretrained"
            )
        if method is None:
            raise ValueError(f"{source} has no 'method' field; it was not written by drt_peft")
        target = config_class(method)
        if not issubclass(target, cls):
            raise ValueError(
                f"{source} is a {method!r} adapter ({target.__name__}), not {cls.method_name!r} ({cls.__name__}); "
                f"load it with {target.__name__}.from_pretrained or DRTConfig.from_pretrained"
            )
        known = {f.name for f in dataclasses.fields(target)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"{source} has fields {unknown} that {target.__name__} does not know; allowed: {sorted(known)}"
            )
        return target(**data)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``adapter_config.json`` into ``save_directory`` atomically: :meth:`to_dict` and the
        ``peft_type`` that makes transformers and PEFT refuse it with a message naming ``DRTModel.from_pretrained``."""
        os.makedirs(save_directory, exist_ok=True)
        data = {**self.to_dict(), "peft_type": PEFT_TYPE}
        atomic_write_bytes(
            os.path.join(save_directory, CONFIG_NAME), json.dumps(data, indent=2, sort_keys=True).encode()
        )

    @classmethod
    def from_pretrained(cls: type[C], path: str | os.PathLike, **hub_kwargs: Any) -> C:
        """Read ``adapter_config.json`` from a folder (or a Hub repo id) and build the right subclass."""
        file = resolve_file(path, CONFIG_NAME, **hub_kwargs)
        try:
            with open(file, encoding="utf-8") as handle:
                data = json.load(handle)
        except json.JSONDecodeError as err:
            raise ValueError(f"{file} is not valid JSON: {err}") from None
        return cls.from_dict(data, source=str(file))
