"""``drt-peft inspect``: an adapter described from its file alone, as a table, as JSON and as a plot."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from conftest import as_saved_before_layer_names, tiny_bert

from drt_peft import (
    DRTConfig,
    DRTModel,
    IntrinsicDimensionConfig,
    MagnitudeConfig,
    NormBiasConfig,
    PruneOrFreezeConfig,
    RandomConfig,
    SupermaskConfig,
    get_drt_model,
)
from drt_peft.apps.cli import main
from drt_peft.apps.inspect_adapter import block_density
from drt_peft.checkpoint.summary import summarize_adapter

#: Config → how its adapter stores ψ (the smallest codec for stored masks).
CONFIGS = {
    "magnitude": (MagnitudeConfig(density=0.1, modules_to_save=["classifier"], bias="all"), "varint"),
    "magnitude-dense": (MagnitudeConfig(density=0.6), "bitmap"),
    "random": (RandomConfig(density=0.3), "seed"),
    "supermask": (SupermaskConfig(density=0.25), "bitmap"),
    "intrinsic-dimension": (IntrinsicDimensionConfig(density=0.05), "none"),
    "prune-or-freeze": (PruneOrFreezeConfig(density=0.5), "bitmap"),
    "norm-bias": (NormBiasConfig(), "none"),
}


def _saved(config: DRTConfig, folder) -> DRTModel:
    model = get_drt_model(tiny_bert(), config)
    model.save_pretrained(folder)
    return model


def _table_rows(text: str) -> list[list[str]]:
    """The rows of the layer table in ``drt-peft inspect``'s output (cells split on runs of spaces)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["#", "layer"])
    return [cells for cells in (line.split() for line in lines[start + 1 :]) if cells and cells[0].isdigit()]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_summary_matches_the_models_layers(name: str, tmp_path) -> None:
    config, encoding = CONFIGS[name]
    model = _saved(config, tmp_path)
    summary = summarize_adapter(tmp_path)
    layers = list(model.drt_layers())
    assert summary.method == config.method_name and summary.config["seed"] == config.seed
    assert [entry.name for entry in summary.layers] == [n for n, _ in layers]
    for entry, (_, layer) in zip(summary.layers, layers, strict=True):
        assert entry.shape == tuple(layer.weight_shape)
        assert entry.numel == layer.base_layer.weight.numel()
        assert entry.d == layer.num_trainable
        assert entry.encoding == encoding
        assert entry.base_dtype == "float32"
        mask = summary.mask(entry.index)
        if encoding in ("seed", "none"):
            assert mask is None and entry.index_bytes == 0
        else:
            assert np.array_equal(mask, layer.get_mask().numpy())
    stored = sum(entry.bytes for entry in summary.layers) + summary.bias_bytes + summary.modules_to_save_bytes
    assert 0 < summary.file_bytes and stored <= summary.file_bytes
    assert summary.base["fingerprint"] == model.drt_config.base_model_fingerprint


def test_inspect_prints_a_table_of_the_layers(tmp_path, capsys) -> None:
    model = _saved(CONFIGS["magnitude"][0], tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = _table_rows(out)
    layers = list(model.drt_layers())
    assert [row[:2] for row in rows] == [[str(i), name] for i, (name, _) in enumerate(layers)]
    for row, (_, layer) in zip(rows, layers, strict=True):
        _, _, shape, numel, d, density, encoding, size = row
        assert shape == "×".join(str(n) for n in layer.weight_shape)
        assert int(numel.replace(",", "")) == layer.base_layer.weight.numel()
        assert int(d.replace(",", "")) == layer.num_trainable
        assert density == f"{layer.num_trainable / layer.base_layer.weight.numel():.2%}"
        assert encoding == "varint" and int(size.replace(",", "")) > 0
    assert "method       magnitude — Han, Pool, Tran & Dally" in out
    assert f"fingerprint  {model.drt_config.base_model_fingerprint}" in out
    assert '"classifier"' in out and "density=0.1" in out


def test_inspect_json_matches_the_model(tmp_path, capsys) -> None:
    model = _saved(CONFIGS["magnitude"][0], tmp_path)
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    layers = list(model.drt_layers())
    assert described["method"] == "magnitude" and described["config"]["density"] == 0.1
    assert described["base"]["fingerprint"] == model.drt_config.base_model_fingerprint
    assert described["d"] == sum(layer.num_trainable for _, layer in layers)
    assert [(entry["name"], entry["shape"], entry["d"], entry["encoding"]) for entry in described["layers"]] == [
        (name, list(layer.weight_shape), layer.num_trainable, "varint") for name, layer in layers
    ]
    assert described["modules_to_save_bytes"] == sum(
        t.numel() * t.element_size() for t in model.get_base_model().classifier.state_dict().values()
    )


def test_inspect_an_adapter_saved_before_layer_names_were_recorded(tmp_path, capsys) -> None:
    model = _saved(CONFIGS["random"][0], tmp_path)
    as_saved_before_layer_names(tmp_path)
    summary = summarize_adapter(tmp_path)
    layers = list(model.drt_layers())
    assert [(entry.name, entry.shape) for entry in summary.layers] == [(None, None)] * len(layers)
    assert [(entry.numel, entry.d) for entry in summary.layers] == [
        (layer.base_layer.weight.numel(), layer.num_trainable) for _, layer in layers
    ]
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "layers are numbered" in out
    rows = _table_rows(out)
    assert [row[:3] for row in rows] == [[str(i), "—", "—"] for i in range(len(layers))]
    assert [int(row[4].replace(",", "")) for row in rows] == [layer.num_trainable for _, layer in layers]


def test_inspect_plot_writes_a_png(tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (the bench extra)")
    model = _saved(CONFIGS["magnitude"][0], tmp_path / "adapter")
    name = next(name for name, _ in model.drt_layers())
    picture = tmp_path / "adapter.png"
    assert main(["inspect", str(tmp_path / "adapter"), "--plot", str(picture), "--layer", name]) == 0
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 10_000
    assert f"wrote {picture}" in capsys.readouterr().out
    _saved(CONFIGS["random"][0], tmp_path / "seeded")  # no stored mask: the density bars alone
    assert main(["inspect", str(tmp_path / "seeded"), "--plot", str(tmp_path / "seeded.png"), "--json"]) == 0
    json.loads(capsys.readouterr().out)  # the JSON stays parseable with --plot
    assert (tmp_path / "seeded.png").read_bytes()[:4] == b"\x89PNG"


def test_inspect_plot_without_matplotlib_says_how_to_install_it(tmp_path, capsys, monkeypatch) -> None:
    _saved(CONFIGS["magnitude"][0], tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert main(["inspect", str(tmp_path), "--plot", str(tmp_path / "x.png")]) == 1
    assert "--plot needs matplotlib" in capsys.readouterr().out and not (tmp_path / "x.png").exists()


def test_inspect_errors_name_what_is_wrong(tmp_path, capsys) -> None:
    assert main(["inspect", str(tmp_path)]) == 1
    assert "adapter_model.safetensors does not exist" in capsys.readouterr().out
    _saved(CONFIGS["magnitude"][0], tmp_path)
    assert main(["inspect", str(tmp_path), "--layer", "nope"]) == 1
    assert "--layer 'nope' is neither a layer number below 13 nor a layer name" in capsys.readouterr().out


def test_block_density_keeps_the_fraction_trained() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((1000, 300)) < 0.1
    picture = block_density(mask, pixels=256)
    assert picture.shape == (250, 150)
    assert abs(picture.mean() - mask.mean()) < 1e-9
    flat = block_density(np.ones(10, dtype=bool))  # a flat mask drawn as a near-square, blank past its end
    assert flat.shape == (3, 4) and np.nansum(flat) == 10 and np.isnan(flat).sum() == 2
