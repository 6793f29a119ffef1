"""A pruned model with sparse inference layers on disk: :func:`save_sparse_model` and :func:`load_sparse_model`.

``DRTModel.merge_and_unload(sparse=...)`` returns a transformers model whose pruned layers are
:class:`~drt_peft.layer.sparse.SparseLinear` modules. transformers cannot rebuild those: its
``from_pretrained`` would find the pruned layers' weights missing and initialise them at random. So a sparse
model gets a folder of its own:

- ``sparse_model.safetensors``: the model's state dict (each tied parameter once; the sparse layers' input
  indices as int16 where they fit, read back as int32) and, in its metadata, the transformers config, the
  model class, each sparse layer's description (:meth:`~drt_peft.layer.sparse.SparseLinear.describe`) and a
  checksum. It alone is enough to load the model, and it is written last: every file is written to a
  temporary file and renamed into place, so an interrupted save leaves the previous model loadable;
- ``config.json``: the transformers config (what ``AutoConfig.from_pretrained`` reads);
- ``sparse_layout.json``: the sparse layers' descriptions, for people and tools.

No ``model.safetensors`` is written, so ``AutoModel.from_pretrained(folder)`` stops with "no file named
model.safetensors" instead of loading random weights in place of the pruned layers.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn
from transformers import AutoConfig, PretrainedConfig
from transformers.pytorch_utils import Conv1D

from ..files import atomic_write_bytes, remove_stale_temporaries, resolve_file
from ..layer import weight_op
from ..layer.sparse import SparseLinear, empty_sparse_module
from ..targeting import tied_aliases
from .io import read_checked_file, tensors_checksum

SPARSE_WEIGHTS_NAME = "sparse_model.safetensors"
SPARSE_LAYOUT_NAME = "sparse_layout.json"
MODEL_CONFIG_NAME = "config.json"
_FORMAT_KEY = "drt_peft_sparse_format"
_FORMAT_VERSION = "1"
#: Input indices below this bound are stored as int16.
_INT16_BOUND = 2**15


def _sparse_layers(model: nn.Module) -> dict[str, SparseLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, SparseLinear)}


def save_sparse_model(model: nn.Module, save_directory: str | os.PathLike) -> None:
    """Write a model from ``merge_and_unload(sparse=...)`` into ``save_directory`` (see the module docstring).

    The files take about the bytes of the kept weights (values plus int16 or int32 indices) and those of the
    dense parameters. Raises ``TypeError`` for a model without a transformers config (it is rebuilt from it)
    and ``ValueError`` for a model without sparse layers (``save_pretrained`` saves those).
    """
    config = getattr(model, "config", None)
    if not isinstance(config, PretrainedConfig):
        raise TypeError(
            f"save_sparse_model saves transformers models (it rebuilds them from model.config); {type(model).__name__} "
            "has no transformers config: save the module with torch.save(model, path) instead"
        )
    layers = _sparse_layers(model)
    if not layers:
        raise ValueError(
            "the model has no sparse layers: merge_and_unload(sparse=...) makes them; save a dense model with "
            "save_pretrained"
        )
    aliases = tied_aliases(model)
    tensors = {
        key: value.detach().cpu().contiguous() for key, value in model.state_dict().items() if key not in aliases
    }
    for name, layer in layers.items():
        if layer.in_features <= _INT16_BOUND:
            for index in layer.index_names:
                tensors[f"{name}.{index}"] = tensors[f"{name}.{index}"].to(torch.int16)
    descriptions = {name: layer.describe() for name, layer in layers.items()}
    metadata = {
        "format": "pt",
        _FORMAT_KEY: _FORMAT_VERSION,
        "model_class": type(model).__name__,
        "config": config.to_json_string(use_diff=False),
        "dtype": str(model.dtype).removeprefix("torch."),
        "sparse_layers": json.dumps(descriptions),
        "drt_checksum": tensors_checksum(tensors),
    }
    os.makedirs(save_directory, exist_ok=True)
    remove_stale_temporaries(save_directory, (MODEL_CONFIG_NAME, SPARSE_LAYOUT_NAME, SPARSE_WEIGHTS_NAME))
    atomic_write_bytes(os.path.join(save_directory, MODEL_CONFIG_NAME), config.to_json_string().encode())
    layout = json.dumps({"model_class": metadata["model_class"], "sparse_layers": descriptions}, indent=2)
    atomic_write_bytes(os.path.join(save_directory, SPARSE_LAYOUT_NAME), layout.encode())
    atomic_write_bytes(os.path.join(save_directory, SPARSE_WEIGHTS_NAME), safetensors_bytes(tensors, metadata))


def load_sparse_model(model_id: str | os.PathLike, model_class: Any | None = None, **hub_kwargs: Any) -> nn.Module:
    """Load what :func:`save_sparse_model` wrote, from a folder or a Hub repo, in eval mode and frozen.

    ``model_class`` builds the model from its config: a transformers class such as
    ``BertForSequenceClassification`` or an Auto class such as ``AutoModelForSequenceClassification`` (default:
    the class that was saved). The model is built from the stored config, its pruned layers are replaced by
    sparse modules of the stored layouts, and every tensor is loaded. Raises ``ValueError`` when the file is
    corrupt, when the built model has no matching layer where a sparse one belongs, and when tensors are
    missing, extra or of another shape, naming them. ``hub_kwargs`` are those of
    ``huggingface_hub.hf_hub_download``.
    """
    file = resolve_file(model_id, SPARSE_WEIGHTS_NAME, **hub_kwargs)
    tensors, metadata = read_checked_file(file, _FORMAT_KEY, _FORMAT_VERSION, "a drt_peft sparse model")
    model = _build(file, metadata, model_class)
    for name, description in json.loads(metadata["sparse_layers"]).items():
        _replace(model, name, description, file)
    _check_tensors(model, tensors, file)
    model.load_state_dict(tensors, strict=False)  # checked above: only tied aliases are absent, filled by their twin
    model.eval()
    model.requires_grad_(False)
    return model


def _build(file: str, metadata: dict[str, str], model_class: Any | None) -> nn.Module:
    import transformers

    name = metadata["model_class"]
    if model_class is None:
        model_class = getattr(transformers, name, None)
        if model_class is None:
            raise ValueError(f"{file} holds a {name}, which transformers does not export: pass model_class")
    config = AutoConfig.for_model(**json.loads(metadata["config"]))
    try:
        model = getattr(model_class, "from_config", model_class)(config)
    except Exception as err:
        raise ValueError(
            f"{file} holds a {name}; model_class={model_class!r} cannot be built from its {type(config).__name__} "
            f"({type(err).__name__}: {err})"
        ) from err
    return model.to(getattr(torch, metadata["dtype"]))


def _replace(model: nn.Module, name: str, description: dict[str, Any], file: str) -> None:
    """Put an empty sparse module of ``description`` where the built model has the dense layer ``name``."""
    try:
        sparse = empty_sparse_module(description)
    except ValueError as err:
        raise ValueError(f"{file}: the sparse layer {name}: {err}") from None
    try:
        dense = model.get_submodule(name)
    except AttributeError:
        dense = None
    shape = tuple(weight_op(dense).to_matrix(dense.weight).shape) if type(dense) in (nn.Linear, Conv1D) else None
    if shape != sparse.shape:
        found = (
            "nothing" if dense is None else f"a {type(dense).__name__}" + (f" of [out, in] {shape}" if shape else "")
        )
        raise ValueError(
            f"{file} has a sparse layer {name} of [out, in] {sparse.shape} where the {type(model).__name__} built "
            f"from its config has {found}; is model_class the class that was saved ({description['layout']} layer)?"
        )
    model.set_submodule(name, sparse)


def _check_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], file: str) -> None:
    """Refuse tensors missing from ``file``, tensors the model does not have, and tensors of another shape."""
    aliases = tied_aliases(model)
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items() if key not in aliases}
    found = {key: tuple(value.shape) for key, value in tensors.items()}
    problems = []
    for what, keys in (
        ("missing", sorted(expected.keys() - found.keys())),
        ("unexpected", sorted(found.keys() - expected.keys())),
    ):
        if keys:
            problems.append(f"{len(keys)} {what} ({keys[:5]}{' ...' if len(keys) > 5 else ''})")
    mismatched = [
        f"{key}: {found[key]} in the file, {shape} in the model"
        for key, shape in expected.items()
        if key in found and found[key] != shape
    ]
    if mismatched:
        problems.append(f"{len(mismatched)} of another shape ({mismatched[:5]})")
    if problems:
        raise ValueError(f"{file} does not fit the model built from its config: tensors " + "; ".join(problems))
