"""``get_drt_model`` and ``DRTModel``: a DRT adapter around any PyTorch / transformers model."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import os
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .base_weights import BaseProbe, fingerprint, seeded_init_
from .composition import ComposedConfig, layer_delta, mask_overlap, weighted_change, weighted_state, weighted_union
from .config import DRTConfig
from .layer import BaseDRTLayer, weight_op
from .layer.sparse import sparse_modules
from .masks import LossFn, compute_indices
from .masks.calibration import as_calibration_data
from .masks.statistics import mask_statistics
from .policy import Policy
from .targeting import Target, find_modules_to_save, find_targets, skipped_linear_modules, tied_aliases


def get_drt_model(
    model: nn.Module,
    config: DRTConfig,
    calibration_data: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    adapter_name: str = "default",
    *,
    calibration_batch_size: int | None = None,
    data_collator: Callable[[list[Any]], Any] | None = None,
) -> DRTModel:
    """Embed ``model``'s targeted weights per ``config`` and freeze everything else.

    Args:
        model: any ``nn.Module``; transformers models get the output head excluded from ``"all-linear"``.
        config: a method config such as ``RandomConfig(density=0.01)``.
        calibration_data: data for data-driven criteria (SNIP, GraSP, FISH, ...): batches (dicts of model
            inputs with labels, so that ``model(**batch).loss`` is the loss; or any batches with ``loss_fn``),
            a ``datasets.Dataset`` / ``IterableDataset``, or rows (dicts of one example each).
        loss_fn: ``loss_fn(model, batch) -> scalar loss`` for models or batches of other shapes.
        adapter_name: the name of this first adapter (more can be added: ``DRTModel.add_adapter``).
        calibration_batch_size: rows per batch when ``calibration_data`` holds rows (default 8).
        data_collator: makes a batch of a list of rows (default: transformers' ``default_data_collator``;
            ``DataCollatorWithPadding(tokenizer)`` pads rows of different lengths).

    The model is modified in place (as PEFT does); :meth:`DRTModel.unload` gives it back unchanged.
    """
    calibration_data = as_calibration_data(calibration_data, calibration_batch_size, data_collator)
    return DRTModel(model, config, calibration_data, loss_fn, adapter_name=adapter_name)


def _check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not name or "." in name or "/" in name:
        raise ValueError(f"adapter_name={name!r} must be a non-empty string without '.' or '/'")


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def _check_untied(model: nn.Module, targets: list[Target]) -> None:
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    for target in targets:
        names = owners.get(id(target.weight), [])
        if len(names) > 1:
            raise ValueError(
                f"cannot embed {target.name}: its weight is tied to {names}; leave it out of target_modules"
            )


def _requires_grad_flags(model: nn.Module) -> dict[str, bool]:
    """Parameter name → ``requires_grad``, under every name a shared parameter has (names survive module swaps)."""
    return {name: param.requires_grad for name, param in model.named_parameters(remove_duplicate=False)}


def _restore_base(model: nn.Module, originals_to_save: dict[str, nn.Module], flags: dict[str, bool]) -> None:
    """Undo an embedding in place: DRT layers back to their base modules at Θ(0), modules_to_save and
    ``requires_grad`` flags as they were."""
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseDRTLayer):
            _set_submodule(model, name, module.unload())
    with torch.no_grad():
        for name, original in originals_to_save.items():
            model.get_submodule(name).load_state_dict(original.state_dict())
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in flags:
            param.requires_grad_(flags[name])


def _check_embeddable(model: nn.Module, targets: list[Target]) -> None:
    """Refuse models that already hold DRT layers, and weights that hold no data (the meta device)."""
    nested = [name for name, module in model.named_modules() if isinstance(module, BaseDRTLayer)]
    if nested:
        raise ValueError(
            f"the model already contains DRT layers ({nested[:3]}{' ...' if len(nested) > 3 else ''}); "
            "get_drt_model cannot embed a model twice: call unload() or merge_and_unload() on its DRTModel first"
        )
    on_meta = [target.name for target in targets if target.weight.is_meta]
    if on_meta:
        raise ValueError(
            f"the weights of {on_meta[:3]} are on the meta device (no data: a model built under init_empty_weights "
            "or loaded with device_map and offloading); load the real weights first, e.g. from_pretrained without "
            "device_map, or model.to_empty(device=...) followed by load_state_dict"
        )


def _drop_tied_aliases(module: DRTModel, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """State-dict hook: each shared tensor once (safetensors refuses aliases, as in ``Trainer`` checkpoints)."""
    for alias in tied_aliases(module, prefix):
        state_dict.pop(alias, None)


def _restore_tied_aliases(module: DRTModel, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """Load-state-dict pre-hook: fill the aliases :func:`_drop_tied_aliases` left out from their twin."""
    for alias, kept in tied_aliases(module, prefix).items():
        if alias not in state_dict and kept in state_dict:
            state_dict[alias] = state_dict[kept]


#: Live DRT models, checked at each optimizer's first step (see :func:`_check_optimizer_holds_values`).
_LIVE_MODELS: weakref.WeakSet[DRTModel] = weakref.WeakSet()
_CHECKED_OPTIMIZERS: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
_optimizer_hook = None


def _held_ids(optimizer: torch.optim.Optimizer) -> set[int]:
    """The ids of the tensors ``optimizer`` updates."""
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def _check_optimizer_holds_values(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Warn once per optimizer that updates a DRT model's base weights but none of its trainable tensors.

    That is an optimizer built before ``get_drt_model`` (on the original parameters): it would train
    nothing of the adapter, silently.
    """
    if optimizer in _CHECKED_OPTIMIZERS:
        return
    _CHECKED_OPTIMIZERS.add(optimizer)
    held = _held_ids(optimizer)
    for model in list(_LIVE_MODELS):
        params = list(model.parameters())
        trainable = {id(p) for p in params if p.requires_grad}
        if trainable and held & {id(p) for p in params} and not held & trainable:
            warnings.warn(
                f"this {type(optimizer).__name__} updates parameters of a DRTModel but none of its trainable ones "
                "(drt_values, modules_to_save): it was built before get_drt_model and trains nothing of the adapter; "
                "build it after: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])",
                stacklevel=3,
            )


def _forward_class(cls: type[DRTModel], wrapped: type[nn.Module]) -> type[DRTModel]:
    """A subclass of ``cls`` whose class-level ``forward`` has the signature of ``wrapped.forward``.

    The ``Trainer`` reads label names (and whether the model can return a loss) from the *class*
    of the model it is given, so the wrapper must advertise the wrapped model's parameters there.
    Its name keeps the wrapped class name visible, e.g. ``DRTModel[BertForQuestionAnswering]``.
    """
    key = (cls, wrapped)
    if key not in _FORWARD_CLASSES:

        def forward(self: DRTModel, *args: Any, **kwargs: Any) -> Any:
            return self.get_base_model()(*args, **kwargs)

        forward.__signature__ = inspect.signature(wrapped.forward)  # type: ignore[attr-defined]
        forward.__doc__ = wrapped.forward.__doc__
        name = f"{cls.__name__}[{wrapped.__name__}]"
        attrs = {"forward": forward, "__module__": cls.__module__, "__qualname__": name, "_wraps_class": wrapped}
        _FORWARD_CLASSES[key] = type(name, (cls,), attrs)
    return _FORWARD_CLASSES[key]


_FORWARD_CLASSES: dict[tuple[type, type], type] = {}


def _new_specialised(cls: type[DRTModel], wrapped: type[nn.Module]) -> DRTModel:
    """Unpickling: an empty instance of the class :func:`_forward_class` makes (it has no importable name)."""
    return nn.Module.__new__(_forward_class(cls, wrapped))


def _find_targets(model: nn.Module, config: DRTConfig) -> tuple[list[Target], list[str]]:
    """The modules ``config`` embeds and the full names of its ``modules_to_save``, after the checks that
    refuse what cannot be embedded (and a warning for linear modules ``"all-linear"`` leaves out)."""
    modules = dict(model.named_modules())
    save_names = find_modules_to_save(model, config.modules_to_save_for(model))
    targets = [
        Target(name, modules[name], weight_op(modules[name]))
        for name in find_targets(model, config.target_modules, exclude=save_names)
    ]
    _check_embeddable(model, targets)
    _check_untied(model, targets)
    if config.target_modules == "all-linear":
        skipped = skipped_linear_modules(model)
        if skipped:
            warnings.warn(
                f"target_modules='all-linear' leaves out {len(skipped)} linear module(s) of types it cannot embed "
                f"(subclasses of nn.Linear such as quantized layers): {skipped[:5]}"
                f"{' ...' if len(skipped) > 5 else ''}; they stay frozen",
                stacklevel=4,
            )
    return targets, save_names


def _watch_optimizers(model: DRTModel) -> None:
    """Have every optimizer's first step checked against ``model`` (see :func:`_check_optimizer_holds_values`)."""
    global _optimizer_hook
    _LIVE_MODELS.add(model)
    if _optimizer_hook is None:
        _optimizer_hook = register_optimizer_step_pre_hook(_check_optimizer_holds_values)


def _check_other_dtype(
    config: DRTConfig, found: str, stored: BaseProbe | None, probe: BaseProbe, names: list[str]
) -> None:
    """Accept a base whose fingerprint differs only if it holds the same weights in another dtype.

    The exact fingerprint decides for bases of the same dtypes and for adapters saved without a
    probe; otherwise the adapter's probe ``stored`` must agree with this base's ``probe``.
    """
    mismatch = (
        "the adapter stores no base probe, so only the exact fingerprint can be checked"
        if stored is None
        else "the dtypes are the same, so the weights differ"
        if stored.same_dtypes(probe)
        else stored.mismatch(probe, names)
    )
    if mismatch is None:
        return
    raise ValueError(
        f"base model mismatch: this adapter was made on a base whose targeted weights have "
        f"base_model_fingerprint={config.base_model_fingerprint!r}, but the given model's are {found!r} "
        f"({mismatch}; base_model_name_or_path={config.base_model_name_or_path!r}). The same targeted weights "
        f"and target_modules are needed, in the same dtype, or in any floating dtype for adapters saved with "
        f"a base probe (which save_pretrained writes)"
    )


class _UpdateWatch:
    """The gradient hook of :meth:`DRTModel.expect_update_masks`: counts backward passes since the last
    ``update_masks`` and warns once past ``2 · every``. An object rather than a closure, so models pickle."""

    def __init__(self, model: DRTModel, every: int) -> None:
        self.model, self.every = model, every

    def __call__(self, _: Tensor) -> None:
        model = self.model
        model._backwards_since_update += 1
        if model._backwards_since_update == 2 * self.every + 1:
            warnings.warn(
                f"{type(model.drt_config).__name__} changes the mask every {self.every} steps, but "
                f"model.update_masks(step, optimizer) has not been called for {2 * self.every + 1} backward passes; "
                "call it after each optimizer step, or train with DRTTrainer / DRTCallback",
                stacklevel=2,
            )


@dataclass
class _SetAside:
    """What an adapter put into its base, kept aside while the base runs bare: its layers and its trained
    ``modules_to_save``, all out of the module tree."""

    layers: dict[str, BaseDRTLayer]
    trained_to_save: dict[str, nn.Module]


def _set_aside(model: DRTModel, lend_originals: bool) -> _SetAside:
    """Give ``model``'s base back bare (as ``unload`` would), keeping the active adapter aside.

    Modules are swapped, never written in place, so a graph built before (a forward awaiting its
    backward) stays valid. The ``modules_to_save`` make way for their originals: lent for the
    while (``lend_originals``, nothing trains meanwhile) or copied (another adapter becomes active).
    """
    base = model.get_base_model()
    layers = dict(model.drt_layers())
    for name, layer in layers.items():
        _set_submodule(base, name, layer.suspend())
    trained = {}
    for name, original in model._originals_to_save.items():
        trained[name] = base.get_submodule(name)
        _set_submodule(base, name, original if lend_originals else copy.deepcopy(original))
    return _SetAside(layers, trained)


def _put_back(model: DRTModel, aside: _SetAside) -> None:
    """Undo :func:`_set_aside`: the same layers and trained modules, exactly as they were."""
    base = model.get_base_model()
    for name, module in aside.trained_to_save.items():
        _set_submodule(base, name, module)
    for name, layer in aside.layers.items():
        layer.resume()
        _set_submodule(base, name, layer)


@dataclass
class _InactiveAdapter:
    """An adapter of the model other than the active one: its policy (which holds its config), its base probe,
    what it set aside, and what it needs to come back."""

    policy: Policy
    probe: BaseProbe
    aside: _SetAside
    originals_to_save: dict[str, nn.Module]
    calibration_data: Iterable[Any] | None
    loss_fn: LossFn | None
    #: ``every`` of ``DRTModel.expect_update_masks`` (None: the method did not ask), re-armed when it comes back.
    update_every: int | None


class DRTModel(nn.Module):
    """A model whose targeted weights train only at d positions (Θ = ψ·ϑ + χ·Θ(0)).

    Attribute access and ``forward`` go to the wrapped model, so a ``DRTModel`` drops into the
    Hugging Face ``Trainer``, a plain PyTorch loop or ``accelerate``. The only trainable tensors
    are each layer's ``drt_values`` (d entries), the targeted biases with ``bias="all"``, and the
    ``modules_to_save``.

    The instance's class is a subclass named after the wrapped model's class
    (``DRTModel[BertForSequenceClassification]``) whose ``forward`` has the wrapped signature, so
    the ``Trainer`` finds the label names and reports ``eval_loss`` and metrics as on the plain model.

    A config with ``base_model_fingerprint`` set is checked against the targeted weights: they
    must have that exact fingerprint or, given the ``base_probe`` saved with the adapter (which
    :meth:`from_pretrained` passes), be the same weights in another dtype.
    ``indices`` gives ψ per layer instead of computing it (loading a saved adapter).
    """

    _wraps_class: type[nn.Module] | None = None

    def __new__(cls, model: nn.Module | None = None, *args: Any, **kwargs: Any) -> DRTModel:
        if model is None or cls._wraps_class is not None:  # copies, or already specialised
            return super().__new__(cls)
        return super().__new__(_forward_class(cls, type(model)))

    def __reduce_ex__(self, protocol: Any) -> Any:
        reduced = super().__reduce_ex__(protocol)
        if self._wraps_class is None:
            return reduced
        return (_new_specialised, (type(self).__mro__[1], self._wraps_class), *reduced[2:])

    def __init__(
        self,
        model: nn.Module,
        config: DRTConfig,
        calibration_data: Iterable[Any] | None = None,
        loss_fn: LossFn | None = None,
        *,
        indices: list[Tensor] | None = None,
        base_probe: BaseProbe | None = None,
        adapter_name: str = "default",
    ) -> None:
        super().__init__()
        if isinstance(model, DRTModel):
            raise TypeError("model is already a DRTModel; call unload() or merge_and_unload() first")
        _check_adapter_name(adapter_name)
        self._requires_grad_before = _requires_grad_flags(model)
        #: The name of the adapter in the model (its layers are in the module tree).
        self.active_adapter = adapter_name
        self._inactive: dict[str, _InactiveAdapter] = {}
        self._attach(model, config, calibration_data, loss_fn, indices, base_probe)
        self._register_state_dict_hook(_drop_tied_aliases)
        self.register_load_state_dict_pre_hook(_restore_tied_aliases)
        _watch_optimizers(self)

    def _attach(
        self,
        model: nn.Module,
        config: DRTConfig,
        calibration_data: Iterable[Any] | None,
        loss_fn: LossFn | None,
        indices: list[Tensor] | None,
        base_probe: BaseProbe | None,
    ) -> None:
        """Embed one adapter into ``model`` (which holds no DRT layer): find its targets, fix Θ(0), select ψ unless
        ``indices`` gives it, build the layers and attach the method."""
        targets, save_names = _find_targets(model, config)
        #: The method's behaviour and state (:class:`~drt_peft.policy.Policy`); it holds the config.
        self.drt_policy: Policy = config.policy(self._record_base(model, targets, config, base_probe))
        if indices is None and config.criterion is None:
            # A method without a criterion selects no entries: its layers replace ψ (e.g. by a projection).
            indices = [torch.empty(0, dtype=torch.int64) for _ in targets]
        elif indices is None:
            indices = compute_indices(model, targets, self.drt_config, calibration_data, loss_fn)
        elif len(indices) != len(targets):
            raise ValueError(f"the adapter has {len(indices)} layers but target_modules selects {len(targets)} here")
        self._embed(model, targets, indices, save_names)
        #: Kept only for methods that re-score during training (FISH with ``update_frequency``).
        self.calibration_data = calibration_data if self.drt_policy.rescores_during_training else None
        self.loss_fn = loss_fn

    def _record_base(
        self, model: nn.Module, targets: list[Target], config: DRTConfig, stored_probe: BaseProbe | None
    ) -> DRTConfig:
        """Fix Θ(0) (seeded re-initialisation), check it against the config's fingerprint (or, across dtypes, the
        adapter's probe) and return the config with the base recorded; keeps this base's probe."""
        if config.base_init == "seeded":
            seeded_init_(targets, model, config.seed, config.seeded_weight_init)
        found = fingerprint(targets)
        #: The probe of the targeted Θ(0) (see :class:`~drt_peft.base_weights.BaseProbe`), saved with the adapter.
        self.base_probe = BaseProbe.of(targets, config.seed)
        if config.base_model_fingerprint not in (None, found):
            _check_other_dtype(config, found, stored_probe, self.base_probe, [t.name for t in targets])
        model_config = getattr(model, "config", None)
        name_or_path = getattr(model_config, "name_or_path", None) or None
        return dataclasses.replace(
            config,
            base_model_fingerprint=found,
            base_model_name_or_path=config.base_model_name_or_path or name_or_path,
            revision=config.revision or getattr(model_config, "_commit_hash", None),
        )

    def _embed(self, model: nn.Module, targets: list[Target], indices: list[Tensor], save_names: list[str]) -> None:
        """Replace the targets by DRT layers, freeze the rest, train the ``modules_to_save`` and attach the method.

        All-or-nothing: if any step fails, ``model`` is put back as it was given.
        """
        flags = _requires_grad_flags(model)
        self._originals_to_save = {}
        try:
            model.requires_grad_(False)
            for target, idx in zip(targets, indices, strict=True):
                layer = self.drt_policy.build_layer(target.module, idx)
                if self.drt_config.autocast_adapter_dtype:
                    layer.upcast_adapter_tensors()
                _set_submodule(model, target.name, layer)
            for name in save_names:
                module = model.get_submodule(name)
                self._originals_to_save[name] = copy.deepcopy(module).requires_grad_(False)
                module.requires_grad_(True)
            self.add_module("base_model", model)  # the state-dict prefix; read as get_base_model()
            self._backwards_since_update = 0
            self._update_watch, self._update_every = None, None
            self.drt_policy.on_attach(self)
        except BaseException:
            _restore_base(model, self._originals_to_save, flags)
            raise

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> DRTModel:
        """As ``nn.Module._apply`` (``to``, ``cuda``, ``half``, ...), and for what waits outside the module tree to
        come back into it: the originals of ``modules_to_save`` and every inactive adapter."""
        super()._apply(fn, recurse)
        if recurse:
            for module in self._outside_the_tree():
                module._apply(fn)
            in_tree = {id(module) for module in self.modules()}
            for adapter in self._inactive.values():
                for layer in adapter.aside.layers.values():
                    # a base module in the tree was converted with it; one that is not (a copy made while another
                    # adapter's modules_to_save took its place) goes with the layer, once
                    layer._apply(fn, recurse=id(layer.base_layer) not in in_tree)
                    in_tree.add(id(layer.base_layer))
        return self

    def _outside_the_tree(self) -> list[nn.Module]:
        """Whole modules that wait outside the tree: originals of ``modules_to_save``, and the policies and trained
        ``modules_to_save`` of the inactive adapters."""
        modules = list(self._originals_to_save.values())
        for adapter in self._inactive.values():
            modules += [adapter.policy, *adapter.originals_to_save.values(), *adapter.aside.trained_to_save.values()]
        return modules

    # -- delegation -------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.get_base_model()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.get_base_model(), name)

    def get_base_model(self) -> nn.Module:
        """The wrapped model, with the DRT layers in it (as PEFT's ``get_base_model``); ``unload()`` gives it back
        as it was, ``merge_and_unload()`` with Θ written in."""
        return super().__getattr__("base_model")

    @property
    def base_model(self) -> nn.Module:
        """The backbone, as on any transformers model: the wrapped model's ``base_model`` (the ``LlamaModel`` of a
        ``LlamaForCausalLM``, which returns ``last_hidden_state``), or the wrapped model itself where it has none.
        Libraries that run the backbone and the head apart (TRL's fused LM head) call it; the wrapped model is
        :meth:`get_base_model`."""
        wrapped = self.get_base_model()
        return getattr(wrapped, "base_model", wrapped)

    # -- inspection -------------------------------------------------------------------------
    @property
    def drt_config(self) -> DRTConfig:
        """The method's config (frozen; held by :attr:`drt_policy`)."""
        return self.drt_policy.config

    def drt_layers(self) -> Iterator[tuple[str, BaseDRTLayer]]:
        """``(name, layer)`` for every embedded layer, names as in the original model."""
        for name, module in self.get_base_model().named_modules():
            if isinstance(module, BaseDRTLayer):
                yield name, module

    @property
    def modules_to_save(self) -> list[str]:
        return list(self._originals_to_save)

    def get_masks(self) -> dict[str, Tensor]:
        """Module name → boolean mask of the trained entries, shaped like its weight."""
        return {name: layer.get_mask() for name, layer in self.drt_layers()}

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)``: trained entries (d, plus biases and modules_to_save) and model size."""
        values = {id(layer.drt_values) for _, layer in self.drt_layers()}
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters() if id(p) not in values)
        return trainable, total

    def drt_statistics(self, per_layer: bool = False) -> dict[str, float]:
        """Trained entries d, overall density, the smallest and largest layer density, how ψ concentrates
        (:func:`~drt_peft.masks.statistics.mask_statistics`: the largest layer's share of d, the share of the
        top 1% rows, the rows and input columns touched), the ITOP exploration rate (dynamic methods) and, with
        ``per_layer``, each layer's density (``drt/density/<name>``) and concentration."""
        layers = list(self.drt_layers())
        d = sum(layer.num_trainable for _, layer in layers)
        sizes = [layer.base_layer.weight.numel() for _, layer in layers]
        total = sum(sizes)
        densities = [layer.num_trainable / size for (_, layer), size in zip(layers, sizes, strict=True)]
        stats = {"drt/trainable": float(d), "drt/density": d / total if total else 0.0}
        if densities:
            stats.update({"drt/density_min": min(densities), "drt/density_max": max(densities)})
        names = [name for name, _ in layers]
        indices = [layer.drt_indices for _, layer in layers]
        shapes = [layer.op.pattern_shape for _, layer in layers]
        stats.update(mask_statistics(names, indices, shapes, per_layer))
        stats.update(self.drt_policy.statistics(self))
        if per_layer:
            stats.update({f"drt/density/{name}": v for (name, _), v in zip(layers, densities, strict=True)})
        return stats

    def print_trainable_parameters(self) -> None:
        """Print the trainable parameter count (d entries, not D) against the model size."""
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    # -- training ---------------------------------------------------------------------------
    def update_masks(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> dict[str, float]:
        """Run the method's per-step policy; call once after each optimizer step.

        Static methods do nothing. Methods that move ψ need the ``optimizer`` that holds the
        trained values, so that its state moves with them. Returns values worth logging. With the
        Trainer, add :class:`drt_peft.DRTCallback` instead.
        """
        self._backwards_since_update = 0
        if self.drt_policy.needs_optimizer:
            self._check_update_optimizer(optimizer)
        return self.drt_policy.on_step(self, step, optimizer)

    def _check_update_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        method = type(self.drt_config).__name__
        if optimizer is None:
            raise ValueError(
                f"optimizer=None: {method} needs the optimizer that trains the model (its state moves with the "
                "trained entries, or its learning rate sets the step); call model.update_masks(step, optimizer)"
            )
        held = _held_ids(optimizer)
        missing = [name for name, layer in self.drt_layers() if id(layer.drt_values) not in held]
        if missing:
            raise ValueError(
                f"optimizer: the {type(optimizer).__name__} passed to update_masks does not hold the trained values "
                f"of {missing[:3]}{' ...' if len(missing) > 3 else ''}; pass the optimizer built on "
                "[p for p in model.parameters() if p.requires_grad] after get_drt_model"
            )

    def expect_update_masks(self, every: int) -> None:
        """Warn once if more than ``2 · every`` backward passes run without :meth:`update_masks`.

        Dynamic methods call this: without the hook their mask would silently never move.
        """
        self._update_every = every
        self._arm_update_watch()

    def _arm_update_watch(self) -> None:
        """Hook :class:`_UpdateWatch` on the first trained values, if the method asked for it and it is not there."""
        layers = [layer for _, layer in self.drt_layers()]
        if self._update_every is None or self._update_watch is not None or not layers:
            return
        watch = _UpdateWatch(self, self._update_every)
        self._update_watch = layers[0].drt_values.register_post_accumulate_grad_hook(watch)

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles leave the gradient hook behind (tensors do not carry it); :meth:`__setstate__` re-arms
        it."""
        return {**self.__dict__, "_update_watch": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._arm_update_watch()

    # -- several adapters ------------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        """``[active_adapter]``: one adapter is active at a time."""
        return [self.active_adapter]

    @property
    def adapters(self) -> dict[str, DRTConfig]:
        """Adapter name → config, the active adapter first."""
        return {self.active_adapter: self.drt_config, **{n: a.policy.config for n, a in self._inactive.items()}}

    def add_adapter(
        self,
        adapter_name: str,
        config: DRTConfig,
        calibration_data: Iterable[Any] | None = None,
        loss_fn: LossFn | None = None,
        *,
        calibration_batch_size: int | None = None,
        data_collator: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        """Add a new adapter on the same base, scored on the base itself (the arguments are those of
        :func:`get_drt_model`); it stays inactive until :meth:`set_adapter`. It costs its d values, ψ and Θ(0)
        at ψ, and its own ``modules_to_save``, never a copy of the base."""
        data = as_calibration_data(calibration_data, calibration_batch_size, data_collator)
        self._add(
            adapter_name, config, lambda _: self._attach(self.get_base_model(), config, data, loss_fn, None, None)
        )

    def load_adapter(
        self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False, **hub_kwargs: Any
    ) -> None:
        """Load a saved adapter (a folder or Hub repo, as :meth:`from_pretrained`) as the inactive adapter
        ``adapter_name``; with ``is_trainable=False`` it stays frozen when it is made active."""
        from .checkpoint.io import read_adapter

        stored = read_adapter(model_id, **hub_kwargs)
        config = stored.config if is_trainable else dataclasses.replace(stored.config, inference_mode=True)

        def build(_: dict[str, _InactiveAdapter]) -> None:
            self._attach(self.get_base_model(), config, None, None, stored.indices, stored.probe)
            stored.load_into(self)

        self._add(adapter_name, config, build)

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the adapter in the model: its layers take the base modules' places, its
        ``modules_to_save`` their trained state, and its method attaches (build the optimizer after this)."""
        if self._known(adapter_name) == self.active_adapter:
            return
        self._swap(adapter_name)
        self.drt_policy.on_attach(self)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name``; deleting the active adapter makes the first remaining one active."""
        if self._known(adapter_name) in self._inactive:
            del self._inactive[adapter_name]
            return
        if not self._inactive:
            raise ValueError(
                f"adapter_name={adapter_name!r} is the only adapter; call unload() to get the base model back"
            )
        self.set_adapter(next(iter(self._inactive)))
        del self._inactive[adapter_name]

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str) -> dict[str, float]:
        """Add ``adapter_name``, the composition Θ = Θ(0) + Σᵢ wᵢ·Δᵢ of ``adapters`` (:mod:`drt_peft.composition`).

        Its ψ is the union of theirs; biases and ``modules_to_save`` they train combine by the same rule.
        The adapters must share the base, the targeted layers and the mode, and be sparse adapters (plain
        :class:`~drt_peft.DRTLayer` layers). It stays inactive until :meth:`set_adapter`. Returns how their
        masks overlap (:func:`~drt_peft.composition.mask_overlap`).
        """
        if not adapters or len(adapters) != len(weights):
            raise ValueError(
                f"adapters={adapters!r}, weights={weights!r}: name at least one adapter and give one weight per adapter"
            )
        names = [self._known(name) for name in adapters]
        layers = [self._adapter_layers(name) for name in names]
        targets = {name: [n for n, _ in named] for name, named in zip(names, layers, strict=True)}
        if any(t != targets[names[0]] for t in targets.values()):
            differ = [name for name in names if targets[name] != targets[names[0]]]
            raise ValueError(
                f"adapters={names}: composed adapters must target the same layers; {differ} target other layers "
                f"than {names[0]!r}"
            )
        configs = [self.adapters[name] for name in names]
        for field_name in ("mode", "base_model_fingerprint"):
            values = {name: getattr(c, field_name) for name, c in zip(names, configs, strict=True)}
            if len(set(values.values())) > 1:
                raise ValueError(f"adapters={names}: composed adapters must share {field_name}, got {values}")
        first = configs[0]
        config = ComposedConfig(
            adapters=names,
            weights=list(weights),
            mode=first.mode,
            bias="all" if any(c.bias == "all" for c in configs) else "none",
            seed=first.seed,
            target_modules=targets[names[0]],
            modules_to_save=sorted({m for c in configs for m in c.modules_to_save or []}) or None,
            base_model_name_or_path=first.base_model_name_or_path,
            revision=first.revision,
            base_model_fingerprint=first.base_model_fingerprint,
            autocast_adapter_dtype=first.autocast_adapter_dtype,
        )
        overlap = mask_overlap(names, [[layer.drt_indices for _, layer in named] for named in layers])
        self._add(adapter_name, config, lambda records: self._compose(records, config, names))
        return overlap

    def _adapter_layers(self, adapter_name: str) -> list[tuple[str, BaseDRTLayer]]:
        if adapter_name == self.active_adapter:
            return list(self.drt_layers())
        return list(self._inactive[adapter_name].aside.layers.items())

    def _compose(self, records: dict[str, _InactiveAdapter], config: ComposedConfig, names: list[str]) -> None:
        """Attach ``config`` to the bare base with the composition of the adapters ``names`` (set aside in
        ``records``)."""
        chosen = [records[name] for name in names]
        combined = [
            weighted_union([layer_delta(n, layer) for n, layer in named], config.weights)
            for named in zip(*(r.aside.layers.items() for r in chosen), strict=True)
        ]
        self._attach(self.get_base_model(), config, None, None, [idx for idx, _ in combined], None)
        with torch.no_grad():
            for (name, layer), (_, delta) in zip(self.drt_layers(), combined, strict=True):
                values = layer.drt_base_values.double() if layer.mode == "freeze" else 0
                layer.drt_values.copy_(values + delta)
                if config.bias == "all" and layer.base_layer.bias is not None:
                    trained = [r.aside.layers[name].trained_bias() for r in chosen]
                    layer.base_layer.bias.copy_(weighted_change(layer.drt_base_bias, trained, config.weights))
            for module_name, original in self._originals_to_save.items():
                trained = [r.aside.trained_to_save.get(module_name) for r in chosen]
                self.get_base_model().get_submodule(module_name).load_state_dict(
                    weighted_state(original.state_dict(), [m and m.state_dict() for m in trained], config.weights)
                )

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model computes exactly as its base: Θ(0) in every targeted weight, the original
        biases and ``modules_to_save`` (as :meth:`unload` gives them). The adapter comes back unchanged after,
        the same tensors, so an optimizer built before keeps working (TRL's reference model for DPO)."""
        aside = _set_aside(self, lend_originals=True)
        try:
            yield
        finally:
            _put_back(self, aside)

    def _known(self, adapter_name: str) -> str:
        if adapter_name != self.active_adapter and adapter_name not in self._inactive:
            raise ValueError(
                f"adapter_name={adapter_name!r} is not an adapter of this model; it has {list(self.adapters)}"
            )
        return adapter_name

    def _add(self, adapter_name: str, config: DRTConfig, build: Callable[[dict[str, _InactiveAdapter]], None]) -> None:
        """Add the inactive adapter ``adapter_name``: with every adapter set aside (``build`` sees them all),
        ``build`` attaches it to the bare base. The active adapter is as it was after, also when building fails."""
        _check_adapter_name(adapter_name)
        if adapter_name in self.adapters:
            raise ValueError(
                f"adapter_name={adapter_name!r} exists already; delete_adapter it first or pick a new name"
            )
        seeded = [name for name, c in {**self.adapters, adapter_name: config}.items() if c.base_init == "seeded"]
        if seeded:
            raise ValueError(
                f"base_init='seeded' (adapters {seeded}) re-draws the base weights, but the adapters of one model "
                "share one base; use one model per seeded adapter"
            )
        active_name, active = self.active_adapter, self._deactivate()
        try:
            build({**self._inactive, active_name: active})
            if config.inference_mode:
                for _, layer in self.drt_layers():
                    layer.requires_grad_(False)
            self._inactive[adapter_name] = self._deactivate()
        except BaseException:
            if "drt_policy" in self._modules:
                _restore_base(self.get_base_model(), self._originals_to_save, {})
            self._activate(active_name, active)
            raise
        self._activate(active_name, active)

    def _swap(self, adapter_name: str) -> None:
        """Make the inactive ``adapter_name`` active and the active one inactive, both exactly as they were."""
        target = self._inactive.pop(adapter_name)
        self._inactive[self.active_adapter] = self._deactivate()
        self._activate(adapter_name, target)

    @contextlib.contextmanager
    def _switched_to(self, adapter_name: str) -> Iterator[None]:
        previous = self.active_adapter
        if adapter_name == previous:
            yield
            return
        self._swap(adapter_name)
        try:
            yield
        finally:
            self._swap(previous)

    def _deactivate(self) -> _InactiveAdapter:
        """Take the active adapter out of the model (which is then its bare base) and return it."""
        if self._update_watch is not None:
            self._update_watch.remove()
            self._update_watch = None
        aside = _set_aside(self, lend_originals=False)
        for name in self._originals_to_save:
            self.get_base_model().get_submodule(name).requires_grad_(False)
        policy = self.drt_policy
        del self.drt_policy
        return _InactiveAdapter(
            policy,
            self.base_probe,
            aside,
            self._originals_to_save,
            self.calibration_data,
            self.loss_fn,
            self._update_every,
        )

    def _activate(self, adapter_name: str, adapter: _InactiveAdapter) -> None:
        """Put ``adapter`` into the bare base as the active adapter ``adapter_name``."""
        self.drt_policy = adapter.policy
        self.base_probe, self._originals_to_save = adapter.probe, adapter.originals_to_save
        self.calibration_data, self.loss_fn = adapter.calibration_data, adapter.loss_fn
        self.active_adapter = adapter_name
        self._backwards_since_update, self._update_every = 0, adapter.update_every
        _put_back(self, adapter.aside)
        self._arm_update_watch()
        for name in self._originals_to_save:
            self.get_base_model().get_submodule(name).requires_grad_(not self.drt_config.inference_mode)

    # -- leaving ---------------------------------------------------------------------------
    def merge_and_unload(self, sparse: str | None = None) -> nn.Module:
        """The plain model with the active adapter's Θ written into each weight (prune mode: zeros at untrained
        entries). Inactive adapters are dropped.

        With ``sparse`` (one of :data:`~drt_peft.layer.sparse.SPARSE_CHOICES`), each pruned ``nn.Linear`` or
        ``Conv1D`` layer (prune mode) becomes an inference module that stores only its kept weights, in that
        layout: ``"csr"``, ``"condensed"`` (every output keeps the same number of inputs, as N:M masks do),
        ``"semi-structured"`` (2:4 on CUDA GPUs) or ``"auto"`` (chosen per layer; see
        :mod:`drt_peft.layer.sparse`). It computes the same outputs, up to float rounding. Layers whose Θ is
        dense (freeze mode, DCT + sparse) and pruned ``Conv2d`` layers merge densely. A layer that cannot take
        the layout, or an adapter with no pruned layer, raises ``ValueError`` before anything changes. Save the
        result with :func:`drt_peft.save_sparse_model` and load it with :func:`drt_peft.load_sparse_model`.
        """
        replacements = {} if sparse is None else sparse_modules(self.drt_layers(), sparse)
        self._inactive.clear()
        for name, layer in list(self.drt_layers()):
            _set_submodule(self.get_base_model(), name, replacements[name] if name in replacements else layer.merge())
        return self.get_base_model()

    def unload(self) -> nn.Module:
        """The plain model as it was before ``get_drt_model``: trained values and modules_to_save undone,
        and every parameter's ``requires_grad`` as it was. Inactive adapters are dropped."""
        _restore_base(self.get_base_model(), self._originals_to_save, self._requires_grad_before)
        self._inactive.clear()
        return self.get_base_model()

    # -- checkpoints -----------------------------------------------------------------------
    def training_state_dict(self) -> dict[str, Tensor]:
        """What resuming training needs beyond the frozen base: every trainable tensor, every DRT buffer
        (ψ, ϑ, Θ(0) at ψ), the layers' extra state (FreezeNet's frozen scale) and the policy's state
        (``drt_policy.*``: the exploration bitmap, SNFS's momentum, DSR's threshold)."""
        trainable = {name for name, param in self.named_parameters() if param.requires_grad}
        return {
            key: value
            for key, value in self.state_dict().items()
            if key in trainable
            or key.startswith("drt_policy.")
            or key.rpartition(".")[2].startswith("drt_")
            or key.endswith("._extra_state")
        }

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        is_main_process: bool = True,
        state_dict: dict[str, Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        """Write ``adapter_config.json``, ``adapter_model.safetensors`` and a model card (atomically).

        Takes the keyword arguments the ``Trainer`` and PEFT pass: ``is_main_process`` (only the main
        process writes), ``state_dict`` (the model's state dict as gathered by the caller, e.g. under
        FSDP: trained tensors are read from it), ``safe_serialization`` (adapters are always safetensors;
        ``False`` is refused) and ``selected_adapters`` (the adapters to save, by default all). As in PEFT,
        the adapter ``"default"`` goes into ``save_directory`` and any other into ``save_directory/<name>``;
        a gathered ``state_dict`` applies to the active adapter. ``save_embedding_layers`` and
        ``max_shard_size`` are accepted and have nothing to act on.
        """
        from .checkpoint.io import save_adapter

        unknown = sorted(set(kwargs) - {"save_embedding_layers", "max_shard_size", "push_to_hub", "token"})
        if unknown:
            raise TypeError(f"save_pretrained() got unexpected keyword arguments {unknown}")
        if kwargs.get("push_to_hub"):
            raise ValueError("save_pretrained(push_to_hub=True) is not supported; call model.push_to_hub(repo_id)")
        if not safe_serialization:
            raise ValueError(
                "safe_serialization=False is not supported: drt_peft adapters are always written as safetensors "
                "(set save_safetensors=True in TrainingArguments, the default)"
            )
        names = list(self.adapters) if selected_adapters is None else list(selected_adapters)
        unknown = [name for name in names if name not in self.adapters]
        if unknown or not names:
            raise ValueError(
                f"selected_adapters={selected_adapters!r}: name adapters of this model, {list(self.adapters)} "
                "(None saves them all)"
            )
        for name in names:
            folder = save_directory if name == "default" else os.path.join(save_directory, name)
            active = name == self.active_adapter
            with self._switched_to(name):
                save_adapter(self, folder, is_main_process=is_main_process, state_dict=state_dict if active else None)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        **hub_kwargs: Any,
    ) -> DRTModel:
        """Load an adapter from a folder or Hub repo onto a freshly built ``model``.

        ``hub_kwargs`` are those of ``huggingface_hub.hf_hub_download`` (``revision``, ``token``,
        ``cache_dir``, ``subfolder``, ...); others raise ``TypeError``. Raises if the base's targeted
        weights differ from those the adapter was trained on. Loading is all-or-nothing: if it fails,
        ``model`` is left exactly as it was given.
        """
        from .checkpoint.io import read_adapter

        stored = read_adapter(model_id, **hub_kwargs)
        loaded = cls(model, stored.config, indices=stored.indices, base_probe=stored.probe, adapter_name=adapter_name)
        try:
            stored.load_into(loaded)
        except BaseException:
            loaded.unload()  # all-or-nothing
            raise
        if not is_trainable:
            loaded.requires_grad_(False)
            loaded.drt_policy.config = dataclasses.replace(loaded.drt_config, inference_mode=True)
            loaded.eval()
        return loaded

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Save the adapter and upload it to ``repo_id``; see :func:`drt_peft.checkpoint.hub.push_to_hub`."""
        from .checkpoint.hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)
