"""Adapter checkpoints: ``adapter_config.json`` + ``adapter_model.safetensors`` + model card.

The safetensors file is self-contained and is the commit point of a save: it holds ϑ (all
layers' trained values concatenated, in the dtype they trained in; loading casts them to the
layer's), ψ (omitted when the config regenerates it from the seed, otherwise in the smallest
lossless encoding per layer), the probe of the base weights
(:class:`~drt_peft.base_weights.BaseProbe`, which lets the adapter load on the same base in
another dtype), and in its metadata the config, the layers' names and weight shapes
(``drt_layers``, read by ``drt-peft inspect``) and checksums. Every file is written to a
temporary file and renamed into place, so an interrupted save leaves the previous adapter loadable.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from ..base_weights import BaseProbe
from ..config import CONFIG_NAME, DRTConfig
from ..files import atomic_write_bytes, remove_stale_temporaries, resolve_file
from ..index_codecs import CODECS, decode, encode_smallest
from .card import model_card
from .protocol import AdapterModel

if TYPE_CHECKING:
    from ..layer import BaseDRTLayer

WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = "1"
#: Metadata key of the layers' names and weight shapes, in layer order (JSON); adapters saved before it
#: existed have only the checksum ``drt_targets`` of the names.
LAYERS_KEY = "drt_layers"


def under_prefix(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``tensors`` whose key starts with ``prefix``, keyed by the rest of the key."""
    return {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors' names, dtypes, shapes and bytes (the ``drt_checksum`` of every file written here)."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def indices_checksum(indices: Iterable[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for idx in indices:
        digest.update(idx.detach().cpu().to(torch.int64).numpy().tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def _targets_checksum(names: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def _check_finite(layers: list[tuple[str, Any]], values: list[torch.Tensor]) -> None:
    bad = [name for (name, _), value in zip(layers, values, strict=True) if not bool(torch.isfinite(value).all())]
    if bad:
        raise ValueError(
            f"refusing to save: the trained values of {len(bad)} layer(s) are not finite (NaN or inf): {bad[:5]}"
            f"{' ...' if len(bad) > 5 else ''}; training diverged: lower the learning rate or clip gradients; on a "
            "half-precision base, keep autocast_adapter_dtype=True and train under autocast (Trainer bf16/fp16) "
            "rather than in pure half precision, where modules_to_save train in the base's dtype and AdamW's "
            "updates underflow. The adapter on disk is left as it was"
        )


def save_adapter(
    model: AdapterModel,
    save_directory: str | os.PathLike,
    is_main_process: bool = True,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write the adapter of ``model`` into ``save_directory`` (see module docstring).

    ``state_dict``, when given, is the model's state dict gathered by the caller (FSDP, DeepSpeed):
    the trained values and ``modules_to_save`` are read from it instead of the live modules.
    Non-finite trained values are refused before anything is written.
    """
    if not is_main_process:
        return
    tensors = _adapter_tensors(model, state_dict)
    probe_tensors, probe_metadata = model.base_probe.to_tensors()
    tensors.update(probe_tensors)
    layers = list(model.drt_layers())
    metadata = {
        "format": "pt",
        "drt_peft_format": FORMAT_VERSION,
        "drt_config": model.drt_config.to_json(),
        "drt_targets": _targets_checksum(name for name, _ in layers),
        LAYERS_KEY: json.dumps([{"name": name, "shape": list(layer.weight_shape)} for name, layer in layers]),
        "drt_index_checksum": indices_checksum(layer.drt_indices for _, layer in layers),
        **probe_metadata,
        "drt_checksum": tensors_checksum(tensors),
    }
    os.makedirs(save_directory, exist_ok=True)
    remove_stale_temporaries(save_directory, ("README.md", WEIGHTS_NAME, CONFIG_NAME))
    card = model_card(model, os.fspath(save_directory))
    atomic_write_bytes(os.path.join(save_directory, "README.md"), card.encode())
    atomic_write_bytes(os.path.join(save_directory, WEIGHTS_NAME), safetensors_bytes(tensors, metadata))
    model.drt_config.save_pretrained(save_directory)


def _adapter_tensors(model: AdapterModel, state_dict: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Everything the adapter stores: ϑ, the layers' own tensors (e.g. a frozen scale), ψ where it is not
    regenerable, trained biases and ``modules_to_save`` (from ``state_dict`` where given)."""
    config = model.drt_config
    layers = list(model.drt_layers())

    def live(key: str, tensor: torch.Tensor) -> torch.Tensor:
        full = f"base_model.{key}"
        return (state_dict[full] if state_dict is not None and full in state_dict else tensor).detach().cpu()

    values = [live(f"{name}.drt_values", layer.drt_values).reshape(-1) for name, layer in layers]
    _check_finite(layers, values)
    tensors: dict[str, torch.Tensor] = {
        "drt_counts": torch.tensor([layer.num_trainable for _, layer in layers], dtype=torch.int64),
    }
    if not config.values_from_base:
        tensors["drt_values"] = torch.cat(values)
    for i, (_, layer) in enumerate(layers):
        for key, value in layer.adapter_tensors().items():
            tensors[f"drt_layer.{i}.{key}"] = value.detach().cpu().contiguous()
    if config.stores_indices:
        tensors.update(_encoded_indices([layer for _, layer in layers]))
    biases = [layer.base_layer.bias for _, layer in layers if layer.base_layer.bias is not None]
    if config.bias == "all" and biases:
        tensors["drt_biases"] = torch.cat([b.detach().reshape(-1).cpu() for b in biases])
    for name in model.modules_to_save:
        for key, value in model.get_base_model().get_submodule(name).state_dict().items():
            tensors[f"modules_to_save.{name}.{key}"] = live(f"{name}.{key}", value).contiguous()
    return tensors


def _encoded_indices(layers: list[BaseDRTLayer]) -> dict[str, torch.Tensor]:
    """ψ of every layer in its smallest lossless encoding (see :mod:`~drt_peft.index_codecs`)."""
    codes, blobs = [], []
    for layer in layers:
        codec, blob = encode_smallest(layer.drt_indices.cpu().numpy(), layer.base_layer.weight.numel())
        codes.append(CODECS.index(codec))
        blobs.append(blob)
    return {
        "drt_index_codecs": torch.tensor(codes, dtype=torch.uint8),
        "drt_index_lengths": torch.tensor([b.size for b in blobs], dtype=torch.int64),
        "drt_index_bytes": torch.from_numpy(np.concatenate(blobs)),
        "drt_numels": torch.tensor([layer.base_layer.weight.numel() for layer in layers]),
    }


def read_adapter_file(file: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of an adapter file, validated; corrupt or foreign files raise ``ValueError``."""
    return read_checked_file(file, "drt_peft_format", FORMAT_VERSION, "a drt_peft adapter")


def read_checked_file(
    file: str, format_key: str, version: str, what: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file whose metadata ``format_key`` is ``version`` and whose
    tensors match its ``drt_checksum``; anything else (``what`` names the expected kind) raises ``ValueError``."""
    try:
        with safe_open(file, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{file} is not a readable safetensors file (corrupted or truncated?): {err}") from None
    if metadata.get(format_key) != version:
        raise ValueError(f"{file} is not {what} of format {version} ({format_key}={metadata.get(format_key)!r})")
    if tensors_checksum(tensors) != metadata.get("drt_checksum"):
        raise ValueError(f"{file} is corrupted: its tensors do not match the checksum recorded when it was saved")
    return tensors, metadata


def _stored_config(
    file: str, metadata: dict[str, str], folder_or_repo: str | os.PathLike, **hub_kwargs: Any
) -> DRTConfig:
    config = DRTConfig.from_dict(json.loads(metadata["drt_config"]), source=file)
    try:
        side = DRTConfig.from_pretrained(folder_or_repo, **hub_kwargs)
    except FileNotFoundError:
        return config
    if side != config:
        warnings.warn(
            f"{CONFIG_NAME} in {folder_or_repo} differs from the config stored in {WEIGHTS_NAME} "
            "(an interrupted save, or an edited file); using the one stored with the weights",
            stacklevel=3,
        )
    return config


def decode_indices(tensors: dict[str, torch.Tensor], file: str) -> list[torch.Tensor]:
    """ψ of every layer from the encoded indices of an adapter file's ``tensors``."""
    counts = tensors["drt_counts"].tolist()
    lengths = tensors["drt_index_lengths"].tolist()
    blobs = np.split(tensors["drt_index_bytes"].numpy(), np.cumsum(lengths)[:-1])
    indices = []
    for i, (code, blob, count, numel) in enumerate(
        zip(tensors["drt_index_codecs"].tolist(), blobs, counts, tensors["drt_numels"].tolist(), strict=True)
    ):
        try:
            indices.append(torch.from_numpy(decode(blob, CODECS[code], count, numel)))
        except (ValueError, IndexError) as err:
            raise ValueError(f"{file}: indices of layer {i} cannot be decoded: {err}") from None
    return indices


@dataclass(frozen=True)
class StoredAdapter:
    """An adapter file read and validated: what building its model needs (config, ψ, base probe) and the
    tensors :meth:`load_into` copies into that model."""

    file: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    config: DRTConfig
    #: ψ per layer, or None when the config regenerates it from the seed.
    indices: list[torch.Tensor] | None
    probe: BaseProbe | None

    def load_into(self, model: AdapterModel) -> None:
        """Check ``model`` (built from :attr:`config` and :attr:`indices`) against the file and copy its tensors in."""
        _load_into(model, self.tensors, self.metadata, self.file)


def read_adapter(model_id: str | os.PathLike, **hub_kwargs: Any) -> StoredAdapter:
    """Read the adapter in the folder or Hub repo ``model_id``; corrupt or foreign files raise ``ValueError``."""
    file = resolve_file(model_id, WEIGHTS_NAME, **hub_kwargs)
    tensors, metadata = read_adapter_file(file)
    config = _stored_config(file, metadata, model_id, **hub_kwargs)
    indices = decode_indices(tensors, file) if config.stores_indices else None
    try:
        probe = BaseProbe.from_tensors(tensors, metadata)
    except ValueError as err:
        raise ValueError(f"{file}: {err}") from None
    return StoredAdapter(file, tensors, metadata, config, indices, probe)


def _load_into(model: AdapterModel, tensors: dict[str, torch.Tensor], metadata: dict[str, str], file: str) -> None:
    config = model.drt_config
    layers = list(model.drt_layers())
    if _targets_checksum(name for name, _ in layers) != metadata["drt_targets"]:
        raise ValueError(f"{file} was saved for other target modules than target_modules selects on this model")
    if indices_checksum(layer.drt_indices for _, layer in layers) != metadata["drt_index_checksum"]:
        raise ValueError(
            f"the mask regenerated from seed={config.seed} differs from the one saved in {file}; "
            "the random number generator or criterion changed since it was saved"
        )
    with torch.no_grad():
        if "drt_values" in tensors:
            values = tensors["drt_values"].split(tensors["drt_counts"].tolist())
            for (_, layer), value in zip(layers, values, strict=True):
                layer.drt_values.copy_(value.to(layer.drt_values.dtype))
        elif not config.values_from_base:
            raise ValueError(f"{file} holds no drt_values, but {config.method_name} adapters store them")
        for i, (_, layer) in enumerate(layers):
            layer.load_adapter_tensors(under_prefix(tensors, f"drt_layer.{i}."))
        if "drt_biases" in tensors:
            biases = [layer.base_layer.bias for _, layer in layers if layer.base_layer.bias is not None]
            for bias, value in zip(biases, tensors["drt_biases"].split([b.numel() for b in biases]), strict=True):
                bias.copy_(value.reshape(bias.shape))
        for name in model.modules_to_save:
            state = under_prefix(tensors, f"modules_to_save.{name}.")
            module = model.get_base_model().get_submodule(name)
            expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
            found = {k: tuple(v.shape) for k, v in state.items()}
            if found != expected:
                raise ValueError(
                    f"{file}: modules_to_save entry {name!r} was saved with tensors {found} but this model's "
                    f"{name} has {expected} (e.g. another number of labels); build the base model as it was when "
                    "the adapter was saved"
                )
            module.load_state_dict(state)


def stored_layers(metadata: dict[str, str]) -> list[dict[str, Any]]:
    """``[{"name": ..., "shape": [...]}, ...]`` as recorded in an adapter file, or [] for files saved without it."""
    if LAYERS_KEY not in metadata:
        return []
    try:
        layers = json.loads(metadata[LAYERS_KEY])
        return [{"name": str(entry["name"]), "shape": [int(n) for n in entry["shape"]]} for entry in layers]
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"the adapter's {LAYERS_KEY} metadata is malformed: {err}") from None


TRAINING_STATE_NAME = "drt_training_state.safetensors"


def save_training_state(model: AdapterModel, save_directory: str | os.PathLike) -> None:
    """Write :meth:`DRTModel.training_state_dict` (what resuming needs beyond the adapter) atomically."""
    tensors = {key: value.detach().cpu().contiguous() for key, value in model.training_state_dict().items()}
    metadata = {
        "format": "pt",
        "drt_peft_format": FORMAT_VERSION,
        "drt_config": model.drt_config.to_json(),
        "drt_checksum": tensors_checksum(tensors),
    }
    os.makedirs(save_directory, exist_ok=True)
    remove_stale_temporaries(save_directory, (TRAINING_STATE_NAME,))
    atomic_write_bytes(os.path.join(save_directory, TRAINING_STATE_NAME), safetensors_bytes(tensors, metadata))


def load_training_state(model: AdapterModel, checkpoint_dir: str | os.PathLike) -> None:
    """Restore what :func:`save_training_state` wrote in ``checkpoint_dir`` into ``model``, in place.

    Refuses a state from another method or another base (the config's fingerprint), and tensors the
    model does not have; ψ may differ from the model's current one (its derived state follows).
    """
    file = os.path.join(checkpoint_dir, TRAINING_STATE_NAME)
    tensors, metadata = read_adapter_file(file)
    saved = DRTConfig.from_dict(json.loads(metadata["drt_config"]), source=file)
    ours = model.drt_config
    if type(saved) is not type(ours) or saved.base_model_fingerprint != ours.base_model_fingerprint:
        raise ValueError(
            f"{file} belongs to a {saved.method_name!r} run on the base {saved.base_model_fingerprint}, but this "
            f"model is {ours.method_name!r} on {ours.base_model_fingerprint}; resume with the model it was saved from"
        )
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{file} holds tensors this model does not have: {result.unexpected_keys[:5]}")
