"""What an adapter file holds, read without a base model: per layer d, density, ψ's encoding and bytes.

Everything comes from ``adapter_model.safetensors`` alone: the counts, index codecs and lengths
and weight sizes it stores, the base probe's sizes and dtypes, and the layer names and shapes
(``drt_layers``; adapters saved before they were recorded show layer numbers and sizes only).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..base_weights import BaseProbe
from ..config import Paper, config_class
from ..files import resolve_file
from ..index_codecs import CODECS
from .io import WEIGHTS_NAME, decode_indices, read_adapter_file, stored_layers, under_prefix


@dataclass(frozen=True)
class LayerSummary:
    """One DRT layer of an adapter file."""

    index: int
    #: The module's name and its weight's shape, or None for adapters saved before they were recorded.
    name: str | None
    shape: tuple[int, ...] | None
    #: D of the layer (entries of its weight), or None when the file records neither sizes nor shapes.
    numel: int | None
    #: d: the entries the layer trains (for intrinsic dimension: the global ϑ, held by the first layer).
    d: int
    #: How ψ is stored: an index codec (``int32``, ``varint``, ``bitmap``), ``seed`` (regenerated from the
    #: seed) or ``none`` (the method's layers have no ψ).
    encoding: str
    index_bytes: int
    value_bytes: int
    #: Bytes of the layer's own tensors (a frozen scale, pruned positions, a temperature).
    other_bytes: int
    #: dtype of the base weight, from the base probe (None for adapters saved without one).
    base_dtype: str | None

    @property
    def density(self) -> float | None:
        return self.d / self.numel if self.numel else None

    @property
    def bytes(self) -> int:
        return self.index_bytes + self.value_bytes + self.other_bytes

    def to_dict(self) -> dict[str, Any]:
        shape = list(self.shape) if self.shape is not None else None
        return {**asdict(self), "shape": shape, "density": self.density, "bytes": self.bytes}


@dataclass(frozen=True)
class AdapterSummary:
    """An adapter file described: its config, its base and its layers."""

    file: str
    file_bytes: int
    method: str
    #: The config's fields as stored in the file (JSON values).
    config: dict[str, Any]
    #: The method's paper, when the method is registered in this installation.
    paper: Paper | None
    layers: list[LayerSummary]
    #: Bytes of the trained biases and of the modules trained in full (``modules_to_save``).
    bias_bytes: int
    modules_to_save_bytes: int
    tensors: dict[str, torch.Tensor] = field(repr=False, compare=False)

    @property
    def d(self) -> int:
        return sum(layer.d for layer in self.layers)

    @property
    def numel(self) -> int | None:
        sizes = [layer.numel for layer in self.layers]
        return None if None in sizes else sum(sizes)

    @property
    def base(self) -> dict[str, str | None]:
        """``name_or_path``, ``revision`` and ``fingerprint`` of the base model the adapter was trained on."""
        return {
            "name_or_path": self.config.get("base_model_name_or_path"),
            "revision": self.config.get("revision"),
            "fingerprint": self.config.get("base_model_fingerprint"),
        }

    def mask(self, layer: int) -> np.ndarray | None:
        """The boolean mask of ``layer`` (shaped like its weight when the shape is recorded, else flat), or None
        when the file does not store ψ (it is regenerated from the seed, or the method has none)."""
        if self.layers[layer].encoding not in CODECS:
            return None
        indices = decode_indices(self.tensors, self.file)[layer].numpy()
        entry = self.layers[layer]
        mask = np.zeros(entry.numel or 0, dtype=bool)
        mask[indices] = True
        return mask.reshape(entry.shape) if entry.shape else mask

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (what ``drt-peft inspect --json`` prints)."""
        numel = self.numel
        return {
            "file": self.file,
            "file_bytes": self.file_bytes,
            "method": self.method,
            "paper": str(self.paper) if self.paper else None,
            "config": self.config,
            "base": self.base,
            "d": self.d,
            "numel": numel,
            "density": self.d / numel if numel else None,
            "bias_bytes": self.bias_bytes,
            "modules_to_save_bytes": self.modules_to_save_bytes,
            "layers": [layer.to_dict() for layer in self.layers],
        }


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _unstored_encoding(method: str) -> str:
    """What stands for ψ when the file stores none: the seed, nothing (the method has no ψ), or unknown."""
    try:
        cls = config_class(method)
    except ValueError:
        return "not stored"
    return "seed" if cls.criterion is not None and cls.indices_from_seed else "none"


def summarize_file(file: str) -> AdapterSummary:
    """Describe the adapter file ``file`` (validated as :func:`~drt_peft.checkpoint.io.read_adapter_file` does)."""
    tensors, metadata = read_adapter_file(file)
    try:
        config = json.loads(metadata["drt_config"])
    except (KeyError, ValueError) as err:
        raise ValueError(f"{file}: the stored config cannot be read: {err}") from None
    method = str(config.pop("method", ""))
    try:
        paper: Paper | None = config_class(method).paper
    except ValueError:
        paper = None
    counts = tensors["drt_counts"].tolist()
    probe = BaseProbe.from_tensors(tensors, metadata)
    recorded = stored_layers(metadata)
    if recorded and len(recorded) != len(counts):
        raise ValueError(f"{file} records {len(recorded)} layer names for {len(counts)} layers")
    stored = "drt_index_codecs" in tensors
    codes = tensors["drt_index_codecs"].tolist() if stored else [None] * len(counts)
    lengths = tensors["drt_index_lengths"].tolist() if stored else [0] * len(counts)
    numels = tensors["drt_numels"].tolist() if stored else None
    if numels is None and probe is not None:
        numels = probe.numels.tolist()
    value_size = tensors["drt_values"].element_size() if "drt_values" in tensors else 0
    fallback = _unstored_encoding(method)
    layers = []
    for i, count in enumerate(counts):
        shape = tuple(recorded[i]["shape"]) if recorded else None
        numel = int(numels[i]) if numels is not None else (int(np.prod(shape)) if shape else None)
        layers.append(
            LayerSummary(
                index=i,
                name=recorded[i]["name"] if recorded else None,
                shape=shape,
                numel=numel,
                d=int(count),
                encoding=CODECS[codes[i]] if stored else fallback,
                index_bytes=int(lengths[i]),
                value_bytes=int(count) * value_size,
                other_bytes=sum(_nbytes(t) for t in under_prefix(tensors, f"drt_layer.{i}.").values()),
                base_dtype=str(probe.dtypes[i]).removeprefix("torch.") if probe is not None else None,
            )
        )
    return AdapterSummary(
        file=file,
        file_bytes=os.path.getsize(file),
        method=method,
        config=config,
        paper=paper,
        layers=layers,
        bias_bytes=_nbytes(tensors["drt_biases"]) if "drt_biases" in tensors else 0,
        modules_to_save_bytes=sum(_nbytes(t) for t in under_prefix(tensors, "modules_to_save.").values()),
        tensors=tensors,
    )


def summarize_adapter(model_id: str | os.PathLike, **hub_kwargs: Any) -> AdapterSummary:
    """Describe the adapter in the folder or Hub repo ``model_id`` (``hub_kwargs``: those of ``hf_hub_download``)."""
    return summarize_file(resolve_file(model_id, WEIGHTS_NAME, **hub_kwargs))
