"""``get_drt_model`` and ``DRTModel``: a DRT adapter around any PyTorch / transformers model."""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .base_weights import BaseProbe, fingerprint, seeded_init_
from .config import DRTConfig
from .layer import DRTLayer, weight_op
from .masks import LossFn, Target, compute_indices
from .targeting import find_modules_to_save, find_targets


def get_drt_model(
    model: nn.Module,
    config: DRTConfig,
    calibration_data: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
) -> DRTModel:
    """Embed ``model``'s targeted weights per ``config`` and freeze everything else.

    Args:
        model: any ``nn.Module``; transformers models get the output head excluded from ``"all-linear"``.
        config: a method config such as ``RandomConfig(density=0.01)``.
        calibration_data: batches for data-driven criteria (SNIP, GraSP, FISH, ...): dicts of model
            inputs with labels, so that ``model(**batch).loss`` is the loss; or any batches with ``loss_fn``.
        loss_fn: ``loss_fn(model, batch) -> scalar loss`` for models or batches of other shapes.

    The model is modified in place (as PEFT does); :meth:`DRTModel.unload` gives it back unchanged.
    """
    return DRTModel(model, config, calibration_data, loss_fn)


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


class DRTModel(nn.Module):
    """A model whose targeted weights train only at d positions (Θ = ψ·ϑ + χ·Θ(0)).

    Attribute access and ``forward`` go to the wrapped model, so a ``DRTModel`` drops into the
    Hugging Face ``Trainer``, a plain PyTorch loop or ``accelerate``. The only trainable tensors
    are each layer's ``drt_values`` (d entries), the targeted biases with ``bias="all"``, and the
    ``modules_to_save``.

    A config with ``base_model_fingerprint`` set is checked against the targeted weights: they
    must have that exact fingerprint or, given the ``base_probe`` saved with the adapter (which
    :func:`~drt_peft.checkpoint.io.load_adapter` passes), be the same weights in another dtype.
    ``indices`` gives ψ per layer instead of computing it (loading a saved adapter).
    """

    def __init__(
        self,
        model: nn.Module,
        config: DRTConfig,
        calibration_data: Iterable[Any] | None = None,
        loss_fn: LossFn | None = None,
        *,
        indices: list[Tensor] | None = None,
        base_probe: BaseProbe | None = None,
    ) -> None:
        super().__init__()
        if isinstance(model, DRTModel):
            raise TypeError("model is already a DRTModel; call unload() or merge_and_unload() first")
        modules = dict(model.named_modules())
        save_names = find_modules_to_save(model, config.modules_to_save_for(model))
        targets = [
            Target(name, modules[name], weight_op(modules[name]))
            for name in find_targets(model, config.target_modules, exclude=save_names)
        ]
        _check_untied(model, targets)
        if config.base_init == "seeded":
            seeded_init_(targets, model, config.seed)
        found = fingerprint(targets)
        #: The probe of the targeted Θ(0) (see :class:`~drt_peft.base_weights.BaseProbe`), saved with the adapter.
        self.base_probe = BaseProbe.of(targets, config.seed)
        if config.base_model_fingerprint not in (None, found):
            _check_other_dtype(config, found, base_probe, self.base_probe, [t.name for t in targets])
        model_config = getattr(model, "config", None)
        name_or_path = getattr(model_config, "name_or_path", None) or None
        self.drt_config = dataclasses.replace(
            config,
            base_model_fingerprint=found,
            base_model_name_or_path=config.base_model_name_or_path or name_or_path,
            revision=config.revision or getattr(model_config, "_commit_hash", None),
        )
        if indices is None and not config.criterion:
            # A method without a criterion selects no entries: its layers replace ψ (e.g. by a projection).
            indices = [torch.empty(0, dtype=torch.int64) for _ in targets]
        elif indices is None:
            indices = compute_indices(model, targets, self.drt_config, calibration_data, loss_fn)
        elif len(indices) != len(targets):
            raise ValueError(f"the adapter has {len(indices)} layers but target_modules selects {len(targets)} here")
        for param in model.parameters():
            param.requires_grad_(False)
        for target, idx in zip(targets, indices, strict=True):
            layer = config.build_layer(target.module, idx)
            if config.autocast_adapter_dtype:
                layer.upcast_adapter_tensors()
            _set_submodule(model, target.name, layer)
        self._originals_to_save = {}
        for name in save_names:
            module = model.get_submodule(name)
            self._originals_to_save[name] = {k: v.detach().clone() for k, v in module.state_dict().items()}
            module.requires_grad_(True)
        self.base_model = model
        #: Kept only for methods that re-score during training (FISH with ``update_frequency``).
        self.calibration_data = calibration_data if self.drt_config.rescores_during_training else None
        self.loss_fn = loss_fn
        self._backwards_since_update = 0
        self._update_watch = None
        self.drt_config.on_attach(self)
        # ``forward`` advertises the wrapped model's signature, so the Trainer keeps the right columns.
        self.forward = functools.update_wrapper(functools.partial(DRTModel.forward, self), model.forward)

    # -- delegation -------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # -- inspection -------------------------------------------------------------------------
    def drt_layers(self) -> Iterator[tuple[str, DRTLayer]]:
        """``(name, layer)`` for every embedded layer, names as in the original model."""
        for name, module in self.base_model.named_modules():
            if isinstance(module, DRTLayer):
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

    def drt_statistics(self) -> dict[str, float]:
        """Trained entries, overall density, ITOP exploration rate (dynamic methods) and per-layer densities."""
        layers = list(self.drt_layers())
        d = sum(layer.num_trainable for _, layer in layers)
        total = sum(layer.base_layer.weight.numel() for _, layer in layers)
        stats = {"drt/trainable": float(d), "drt/density": d / total}
        rates = [(layer.exploration, layer.base_layer.weight.numel()) for _, layer in layers]
        if all(rate is not None for rate, _ in rates):
            stats["drt/itop_exploration"] = sum(rate * size for rate, size in rates) / total
        for name, layer in layers:
            stats[f"drt/density/{name}"] = layer.num_trainable / layer.base_layer.weight.numel()
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

        Static methods do nothing. Returns values worth logging. With the Trainer, add
        :class:`drt_peft.DRTCallback` instead.
        """
        self._backwards_since_update = 0
        return self.drt_config.on_step(self, step, optimizer)

    def expect_update_masks(self, every: int) -> None:
        """Warn once if more than ``2 · every`` backward passes run without :meth:`update_masks`.

        Dynamic methods call this: without the hook their mask would silently never move.
        """
        layers = [layer for _, layer in self.drt_layers()]
        if self._update_watch is not None or not layers:
            return

        def count(_: Tensor) -> None:
            self._backwards_since_update += 1
            if self._backwards_since_update == 2 * every + 1:
                warnings.warn(
                    f"{type(self.drt_config).__name__} changes the mask every {every} steps, but "
                    f"model.update_masks(step, optimizer) has not been called for {2 * every + 1} backward passes; "
                    "call it after each optimizer step, or train with DRTTrainer / DRTCallback",
                    stacklevel=2,
                )

        self._update_watch = layers[0].drt_values.register_post_accumulate_grad_hook(count)

    # -- leaving ---------------------------------------------------------------------------
    def _replace_layers(self, how: str) -> nn.Module:
        for name, layer in list(self.drt_layers()):
            _set_submodule(self.base_model, name, getattr(layer, how)())
        return self.base_model

    def merge_and_unload(self) -> nn.Module:
        """The plain model with Θ written into each weight (prune mode: zeros at untrained entries)."""
        return self._replace_layers("merge")

    def unload(self) -> nn.Module:
        """The plain model as it was before ``get_drt_model``: trained values and modules_to_save undone."""
        model = self._replace_layers("unload")
        with torch.no_grad():
            for name, state in self._originals_to_save.items():
                model.get_submodule(name).load_state_dict(state)
        return model

    # -- checkpoints -----------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write ``adapter_config.json``, ``adapter_model.safetensors`` and a model card (atomically)."""
        from .checkpoint.io import save_adapter

        save_adapter(self, save_directory, **kwargs)

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, model_id: str | os.PathLike, is_trainable: bool = False, **hub_kwargs: Any
    ) -> DRTModel:
        """Load an adapter from a folder or Hub repo onto a freshly built ``model``.

        Raises if the base's targeted weights differ from those the adapter was trained on.
        """
        from .checkpoint.io import load_adapter

        return load_adapter(model, model_id, is_trainable=is_trainable, **hub_kwargs)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Save the adapter and upload it to ``repo_id``; see :func:`drt_peft.checkpoint.hub.push_to_hub`."""
        from .checkpoint.hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)
