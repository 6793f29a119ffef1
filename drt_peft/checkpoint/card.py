"""The model card (``README.md``) written next to an adapter: what it trains, how to load it, what to cite.

Its YAML front matter is what the Hub reads (``library_name``, ``base_model`` when the base is a
Hub id, tags); the body names the method, density, d, mode, base model and revision, a snippet
that loads the adapter, and the papers to cite.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from typing import TYPE_CHECKING

from ..config import SURVEY

if TYPE_CHECKING:
    from torch import nn

    from .protocol import AdapterModel

#: A Hub repository id (``name`` or ``owner/name``); anything else (a local path) stays out of the YAML.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_PLAIN_YAML = re.compile(r"^[A-Za-z0-9][\w./-]*$")

#: transformers' Auto classes tried for the usage snippet, in order, with the mapping naming their classes.
_AUTO_CLASSES = (
    ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
    ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    ("AutoModelForMultipleChoice", "MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES"),
    ("AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForAudioClassification", "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModel", "MODEL_MAPPING_NAMES"),
)


def is_hub_id(name: str | None) -> bool:
    """Whether ``name`` reads as a Hub repository id rather than a local folder."""
    return bool(name) and _HUB_ID.match(name) is not None and ".." not in name and not os.path.isdir(name)


def _yaml(value: str) -> str:
    """``value`` as a YAML scalar: bare when it is plain, else double-quoted (JSON strings are valid YAML)."""
    return value if _PLAIN_YAML.match(value) else json.dumps(value)


def loader_class(model: nn.Module) -> str | None:
    """The transformers class that builds ``model`` with ``from_pretrained`` (an Auto class where one maps to
    its class), or None for models that are not transformers models."""
    cls = type(model)
    if not cls.__module__.startswith("transformers."):
        return None
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:  # pragma: no cover - transformers is a dependency
        return cls.__name__
    for auto, mapping in _AUTO_CLASSES:
        names = getattr(modeling_auto, mapping, {}).get(model_type, ())
        if cls.__name__ in ((names,) if isinstance(names, str) else names):
            return auto
    return cls.__name__


def usage_snippet(model: AdapterModel, adapter_id: str) -> str:
    """Python that builds the base model and loads the adapter onto it."""
    config = model.drt_config
    base = config.base_model_name_or_path
    loader = loader_class(model.get_base_model()) if base else None
    if loader is None:
        return (
            "from drt_peft import DRTModel\n\n"
            "base = ...  # the model the adapter was trained on (its weights must match the base fingerprint)\n"
            f"model = DRTModel.from_pretrained(base, {json.dumps(adapter_id)})\n"
        )
    arguments = [json.dumps(base)]
    if config.revision:
        arguments.append(f"revision={json.dumps(config.revision)}")
    num_labels = getattr(getattr(model.get_base_model(), "config", None), "num_labels", None)
    if "Classification" in loader and isinstance(num_labels, int):
        arguments.append(f"num_labels={num_labels}")
    return (
        f"from transformers import {loader}\n"
        "from drt_peft import DRTModel\n\n"
        f"base = {loader}.from_pretrained({', '.join(arguments)})\n"
        f"model = DRTModel.from_pretrained(base, {json.dumps(adapter_id)})\n"
    )


def model_card(model: AdapterModel, adapter_id: str = "path/to/adapter") -> str:
    """The README.md of ``model``'s adapter; ``adapter_id`` is the folder or Hub repo the snippet loads."""
    config = model.drt_config
    layers = list(model.drt_layers())
    d = sum(layer.num_trainable for _, layer in layers)
    total = sum(layer.base_layer.weight.numel() for _, layer in layers)
    base = config.base_model_name_or_path
    front = ["library_name: drt_peft"]
    if is_hub_id(base):
        front += [f"base_model: {_yaml(base)}", "base_model_relation: adapter"]
    front += ["tags:", "- drt_peft", "- sparse-fine-tuning", f"- {_yaml(config.method_name)}"]

    if config.density is not None:
        configured = f" (configured density={config.density})"
    elif config.num_trainable is not None:
        configured = f" (configured num_trainable={config.num_trainable:,})"
    else:
        configured = f" ({config.method_name} decides what trains)"
    untrained = "stay frozen at their base values" if config.mode == "freeze" else "are pruned to zero"
    rows = [
        ("method", f"`{config.method_name}` (`{type(config).__name__}`)"),
        ("density", f"{d / total:.4%} of the targeted weights{configured}" if total else "no weight entries"),
        ("d", f"{d:,} trained entries of D = {total:,} in {len(layers)} weight tensors"),
        ("mode", f"`{config.mode}`: the untrained entries {untrained}"),
        ("budget, structure, base init", f"`{config.budget}`, `{config.structure}`, `{config.base_init}`"),
    ]
    if model.modules_to_save:
        rows.append(("trained in full", ", ".join(f"`{name}`" for name in model.modules_to_save)))
    if base:
        rows.append(("base model", f"`{base}`"))
    if config.revision:
        rows.append(("revision", f"`{config.revision}`"))
    if config.base_model_fingerprint:
        rows.append(("base fingerprint", f"`{config.base_model_fingerprint}`"))
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)

    paper = type(config).paper
    citations = [f"- The method: {paper.markdown()}."] if paper != SURVEY else []
    citations.append(f"- The embedding Θ = ψ·ϑ + χ·Θ(0) every DRT method trains through: {SURVEY.markdown()}.")
    title = f"{config.method_name} DRT adapter" + (f" for `{base}`" if base else "")
    return (
        "---\n" + "\n".join(front) + "\n---\n\n"
        f"# {title}\n\n"
        "A drt_peft adapter (Dimensionality Reduced Training), Θ = ψ·ϑ + χ·Θ(0): only the entries ψ of the "
        "targeted weights train, their values ϑ are stored here, and the other entries keep the base model's "
        "values or are pruned (`mode`).\n\n"
        "| | |\n|---|---|\n" + table + "\n\n"
        "## Usage\n\n"
        "```python\n" + usage_snippet(model, adapter_id) + "```\n\n"
        f"`drt-peft inspect {shlex.quote(adapter_id)}` lists its layers without loading a model.\n\n"
        "## Citation\n\n" + "\n".join(citations) + "\n"
    )
