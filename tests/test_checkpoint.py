"""save_pretrained / from_pretrained: identical outputs, compact files, validated loads."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import (
    assert_loads_identically,
    assert_save_load_roundtrip,
    random_lm_batch,
    tiny_bert,
    tiny_gpt2,
    train_steps,
)
from transformers import BertConfig, BertModel

from drt_peft import DRTConfig, DRTModel, MagnitudeConfig, RandomConfig, get_drt_model
from drt_peft.base_weights import PROBE_BYTES_PER_LAYER
from drt_peft.checkpoint import io
from drt_peft.index_codecs import CODECS, decode, encode, encode_smallest


def _trained(config: DRTConfig, batch: dict, factory=tiny_bert) -> DRTModel:
    model = get_drt_model(factory(), config)
    train_steps(model, [batch] * 2)
    return model


CONFIGS = {
    "random-freeze": RandomConfig(density=0.1, modules_to_save=["classifier"]),
    "random-prune-global": RandomConfig(density=0.1, mode="prune", budget="global"),
    "magnitude-erk-bias": MagnitudeConfig(density=0.05, budget="erk", bias="all", modules_to_save=["classifier"]),
    "magnitude-rows-seeded": MagnitudeConfig(density=0.2, structure="rows", base_init="seeded", seed=7),
    "random-2:4": RandomConfig(density=0.5, structure="2:4", mode="prune"),
    "magnitude-prune-sparse-kernels": MagnitudeConfig(density=0.02, mode="prune", bias="all"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_save_load_reproduces_logits_exactly(name: str, tmp_path, bert_batch: dict) -> None:
    model = _trained(CONFIGS[name], bert_batch)
    loaded = assert_save_load_roundtrip(model, tiny_bert(), {"input_ids": bert_batch["input_ids"]}, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = DRTModel.from_pretrained(tiny_bert(), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters() == model.get_nb_trainable_parameters()


def test_gpt2_conv1d_round_trip(tmp_path) -> None:
    batch = random_lm_batch(torch.Generator().manual_seed(0), size=2)
    model = _trained(MagnitudeConfig(density=0.1), batch, factory=tiny_gpt2)
    assert_save_load_roundtrip(model, tiny_gpt2(), batch, tmp_path)


def _bert_for_size() -> BertModel:
    torch.manual_seed(0)
    return BertModel(
        BertConfig(vocab_size=32, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512)
    )


@pytest.mark.parametrize(
    ("config", "bytes_per_value"), [(RandomConfig(density=0.01), 4), (MagnitudeConfig(density=0.01), 6)]
)
def test_adapter_file_size_bounds(config: DRTConfig, bytes_per_value: int, tmp_path) -> None:
    model = get_drt_model(_bert_for_size(), config)
    model.save_pretrained(tmp_path)
    d = sum(layer.num_trainable for _, layer in model.drt_layers())
    size = os.path.getsize(tmp_path / "adapter_model.safetensors")
    probe = PROBE_BYTES_PER_LAYER * len(list(model.drt_layers()))  # the base probe (loading across dtypes)
    assert d > 3000
    assert size <= bytes_per_value * d + 4096 + probe, (size, d)
    if not config.stores_indices:
        assert size <= 4 * d + 4096 + probe


@pytest.mark.parametrize("density", [0.001, 0.01, 0.3, 0.9, 1.0])
def test_index_codecs_round_trip(density: float) -> None:
    rng = np.random.default_rng(0)
    numel = 50_000
    indices = np.sort(rng.choice(numel, size=max(1, int(density * numel)), replace=False))
    sizes = {}
    for codec in CODECS:
        blob = encode(indices, numel, codec)
        sizes[codec] = blob.size
        assert np.array_equal(decode(blob, codec, indices.size, numel), indices)
    best, blob = encode_smallest(indices, numel)
    assert blob.size == min(sizes.values()) and sizes[best] == blob.size
    big_gaps = np.array([0, 2**20, 2**34], dtype=np.int64)
    assert np.array_equal(decode(encode(big_gaps, 2**35, "varint"), "varint", 3, 2**35), big_gaps)


def test_codec_rejects_damaged_data() -> None:
    indices = np.array([3, 10, 400])
    blob = encode(indices, 1000, "varint")
    with pytest.raises(ValueError, match="complete values"):
        decode(blob[:-1], "varint", 3, 1000)
    with pytest.raises(ValueError, match="out of range"):
        decode(encode(indices, 1000, "int32"), "int32", 3, 100)


def test_interrupted_save_keeps_the_previous_adapter(tmp_path, bert_batch: dict, monkeypatch) -> None:
    first = _trained(RandomConfig(density=0.1, seed=1), bert_batch)
    first.save_pretrained(tmp_path)
    second = _trained(MagnitudeConfig(density=0.2), bert_batch)
    real_replace = os.replace

    def crash_on_weights(src, dst):
        if str(dst).endswith("adapter_model.safetensors"):
            raise KeyboardInterrupt("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", crash_on_weights)
    with pytest.raises(KeyboardInterrupt):
        second.save_pretrained(tmp_path)
    monkeypatch.setattr(io.os, "replace", real_replace)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert_loads_identically(first, tiny_bert(), tmp_path, {"input_ids": bert_batch["input_ids"]})


def test_stale_adapter_config_warns_and_the_weights_file_wins(tmp_path, bert_batch: dict) -> None:
    model = _trained(RandomConfig(density=0.1), bert_batch)
    model.save_pretrained(tmp_path)
    MagnitudeConfig(density=0.3).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="differs from the config stored"):
        loaded = DRTModel.from_pretrained(tiny_bert(), tmp_path)
    assert loaded.drt_config.method_name == "random"


def test_corrupted_or_truncated_files_raise(tmp_path, bert_batch: dict) -> None:
    _trained(RandomConfig(density=0.1), bert_batch).save_pretrained(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors is not a readable safetensors file"):
        DRTModel.from_pretrained(tiny_bert(), tmp_path)
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF
    file.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="is corrupted"):
        DRTModel.from_pretrained(tiny_bert(), tmp_path)
    os.unlink(file)
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.safetensors does not exist"):
        DRTModel.from_pretrained(tiny_bert(), tmp_path)


def test_loading_onto_a_different_base_fails(tmp_path, bert_batch: dict) -> None:
    _trained(MagnitudeConfig(density=0.1), bert_batch).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="base model mismatch"):
        DRTModel.from_pretrained(tiny_bert(seed=1), tmp_path)
    changed = tiny_bert()  # a few changed weights, same dtype (the same weights in another dtype load:
    with torch.no_grad():  # tests/test_mixed_precision.py)
        changed.bert.encoder.layer[1].output.dense.weight[0, :3] += 1e-3
    with pytest.raises(ValueError, match="base model mismatch"):
        DRTModel.from_pretrained(changed, tmp_path)


def test_config_round_trip_and_method_check(tmp_path) -> None:
    config = MagnitudeConfig(density=0.02, budget="erk", structure="2:4", target_modules=["query", "value"])
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["method"] == "magnitude"
    assert DRTConfig.from_pretrained(tmp_path) == config
    assert MagnitudeConfig.from_pretrained(tmp_path) == config
    with pytest.raises(ValueError, match="is a 'magnitude' adapter \\(MagnitudeConfig\\), not 'random'"):
        RandomConfig.from_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"method": "magnitude", "density": 0.1, "sparsity": 3}))
    with pytest.raises(ValueError, match="fields \\['sparsity'\\]"):
        DRTConfig.from_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"method": "nope", "density": 0.1}))
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        DRTConfig.from_pretrained(tmp_path)
