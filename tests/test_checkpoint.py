"""save_pretrained / from_pretrained: identical outputs, compact files, validated loads."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import yaml
from conftest import (
    as_saved_before_layer_names,
    assert_loads_identically,
    assert_same_adapter,
    assert_same_outputs,
    assert_save_load_roundtrip,
    random_lm_batch,
    saved_tiny_bert,
    tiny_bert,
    tiny_gpt2,
    train_steps,
)
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification, BertConfig, BertModel

from drt_peft import DRTConfig, DRTModel, MagnitudeConfig, RandomConfig, available_methods, get_drt_model
from drt_peft.base_weights import PROBE_BYTES_PER_LAYER
from drt_peft.checkpoint import io
from drt_peft.config import PEFT_TYPE, SURVEY, Paper, config_class
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


# -- files other tools read: adapter_config.json (transformers, PEFT) and the model card --------------------


def test_transformers_on_an_adapter_folder_says_to_use_drtmodel(tmp_path, bert_batch: dict) -> None:
    pytest.importorskip("peft", reason="transformers takes a folder for a PEFT adapter only when peft is installed")
    from peft import PeftModel

    base = saved_tiny_bert(tmp_path / "base")
    model = _trained(RandomConfig(density=0.1, modules_to_save=["classifier"]), bert_batch, factory=lambda: base)
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base") and config["peft_type"] == PEFT_TYPE
    with pytest.raises((KeyError, ValueError, TypeError), match=r"drt_peft\.DRTModel\.from_pretrained"):
        AutoModelForSequenceClassification.from_pretrained(str(adapter))
    with pytest.raises((KeyError, ValueError, TypeError), match=r"drt_peft\.DRTModel\.from_pretrained"):
        PeftModel.from_pretrained(tiny_bert(), str(adapter))
    assert DRTConfig.from_pretrained(adapter) == model.drt_config  # the key is read and ignored
    fresh = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    assert_loads_identically(model, fresh, adapter, {"input_ids": bert_batch["input_ids"]})


def test_a_peft_adapter_config_is_refused_naming_peft(tmp_path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    with pytest.raises(ValueError, match=r"is a PEFT adapter \(peft_type='LORA'\).*peft\.PeftModel\.from_pretrained"):
        DRTConfig.from_pretrained(tmp_path)


def test_the_adapter_file_records_layer_names_and_shapes(tmp_path) -> None:
    model = get_drt_model(tiny_bert(), MagnitudeConfig(density=0.1))
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as handle:
        recorded = io.stored_layers(handle.metadata())
    assert recorded == [{"name": name, "shape": list(layer.weight_shape)} for name, layer in model.drt_layers()]


def test_an_adapter_saved_before_layer_names_and_peft_type_still_loads(tmp_path, bert_batch: dict) -> None:
    model = _trained(MagnitudeConfig(density=0.1, modules_to_save=["classifier"]), bert_batch)
    model.save_pretrained(tmp_path)
    as_saved_before_layer_names(tmp_path)
    assert "peft_type" not in json.loads((tmp_path / "adapter_config.json").read_text())
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as handle:
        assert io.stored_layers(handle.metadata()) == []
    assert_loads_identically(model, tiny_bert(), tmp_path, {"input_ids": bert_batch["input_ids"]})


def _card(folder) -> tuple[dict, str]:
    """The model card in ``folder``: its YAML front matter (parsed) and its markdown body."""
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    front, body = text[len("---\n") :].split("\n---\n", 1)
    return yaml.safe_load(front), body


def test_the_model_card_names_method_size_base_revision_and_paper(tmp_path) -> None:
    base = "google-bert/bert-base-uncased"
    config = RandomConfig(
        density=0.1, modules_to_save=["classifier"], base_model_name_or_path=base, revision="0123abcd"
    )
    model = get_drt_model(tiny_bert(), config)
    model.save_pretrained(tmp_path / "adapter")
    front, body = _card(tmp_path / "adapter")
    assert front == {
        "library_name": "drt_peft",
        "base_model": "google-bert/bert-base-uncased",
        "base_model_relation": "adapter",
        "tags": ["drt_peft", "sparse-fine-tuning", "random"],
    }
    d = sum(layer.num_trainable for _, layer in model.drt_layers())
    total = sum(layer.base_layer.weight.numel() for _, layer in model.drt_layers())
    assert "| method | `random` (`RandomConfig`) |" in body
    assert f"| density | {d / total:.4%} of the targeted weights (configured density=0.1) |" in body
    assert f"| d | {d:,} trained entries of D = {total:,} in 13 weight tensors |" in body
    assert "| mode | `freeze`" in body and "| trained in full | `classifier` |" in body
    assert "| base model | `google-bert/bert-base-uncased` |" in body and "| revision | `0123abcd` |" in body
    assert f"*{RandomConfig.paper.title}*, ICLR 2022" in body and f"*{SURVEY.title}*" in body
    assert (
        'base = AutoModelForSequenceClassification.from_pretrained("google-bert/bert-base-uncased", '
        'revision="0123abcd", num_labels=2)' in body
    )
    assert f'model = DRTModel.from_pretrained(base, "{tmp_path / "adapter"}")' in body
    assert "unknown" not in body


def test_the_model_cards_snippet_loads_the_adapter(tmp_path, bert_batch: dict) -> None:
    base = saved_tiny_bert(tmp_path / "base")
    model = _trained(MagnitudeConfig(density=0.1, modules_to_save=["classifier"]), bert_batch, factory=lambda: base)
    model.save_pretrained(tmp_path / "adapter")
    front, body = _card(tmp_path / "adapter")
    assert "base_model" not in front  # a local folder is no Hub id
    assert f"| base model | `{tmp_path / 'base'}` |" in body and "revision" not in body
    snippet = body.split("```python\n")[1].split("```")[0]
    namespace: dict = {}
    exec(snippet, namespace)
    assert_same_adapter(namespace["model"], model)
    assert_same_outputs(namespace["model"], model, {"input_ids": bert_batch["input_ids"]}, "the snippet's model")


def test_the_model_card_without_a_recorded_base(tmp_path) -> None:
    model = get_drt_model(tiny_bert(), MagnitudeConfig(num_trainable=500))  # built from a config: no name or path
    assert model.drt_config.base_model_name_or_path is None
    model.save_pretrained(tmp_path)
    front, body = _card(tmp_path)
    assert front == {"library_name": "drt_peft", "tags": ["drt_peft", "sparse-fine-tuning", "magnitude"]}
    assert "unknown" not in body and "| base model |" not in body
    assert "(configured num_trainable=500)" in body and "| d | 500 trained entries" in body
    assert "base = ...  # the model the adapter was trained on" in body
    assert f"| base fingerprint | `{model.drt_config.base_model_fingerprint}` |" in body
    assert f"*{MagnitudeConfig.paper.title}*" in body


def test_every_method_names_its_paper() -> None:
    builtin = [config_class(m) for m in available_methods() if config_class(m).__module__.startswith("drt_peft.")]
    assert len(builtin) >= 20
    for cls in builtin:
        paper = cls.__dict__.get("paper")  # its own, not inherited from the method it extends
        assert isinstance(paper, Paper) and paper != SURVEY, cls.__name__
        assert paper.authors and paper.title and paper.venue and 2010 <= paper.year <= 2030, paper
