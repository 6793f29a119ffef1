"""Pruned models that store only their kept weights: ``merge_and_unload(sparse=...)``, ``save_sparse_model`` and
``load_sparse_model`` (drt_peft.layer.sparse, drt_peft.checkpoint.sparse_model)."""

from __future__ import annotations

import copy
import os
import pickle

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_bert, tiny_convnet, tiny_gpt2
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForSequenceClassification, BertForMaskedLM, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from drt_peft import (
    DCTSparseConfig,
    MagnitudeConfig,
    RandomConfig,
    SupermaskConfig,
    get_drt_model,
    load_sparse_model,
    save_sparse_model,
)
from drt_peft.checkpoint.io import tensors_checksum
from drt_peft.checkpoint.sparse_model import SPARSE_WEIGHTS_NAME
from drt_peft.layer.ops import csr_structure
from drt_peft.layer.sparse import (
    CondensedLinear,
    CSRLinear,
    SemiStructuredLinear,
    SparseLinear,
    empty_sparse_module,
)

PRUNED_90 = RandomConfig(density=0.1, mode="prune")
#: Exactly one of every 8 inputs kept: constant fan-in, so "auto" chooses the condensed layout.
ONE_OF_EIGHT = MagnitudeConfig(density=0.125, structure="1:8", mode="prune")
TWO_OF_FOUR = MagnitudeConfig(density=0.5, structure="2:4", mode="prune")


def _merged(model: nn.Module, config, sparse: str | None) -> nn.Module:
    return get_drt_model(copy.deepcopy(model), config).merge_and_unload(sparse=sparse)


def _sparse_layers(model: nn.Module) -> dict[str, SparseLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SparseLinear)}


def _logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def _pruned_matrix(out: int, fan_in: int, density: float, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, fan_in, generator=g, dtype=dtype) * (torch.rand(out, fan_in, generator=g) < density)


def _module(cls: type[SparseLinear], weight: torch.Tensor, bias: torch.Tensor | None) -> SparseLinear:
    positions = torch.nonzero(weight.reshape(-1)).flatten()
    crow, col = csr_structure(positions, tuple(weight.shape))
    return cls.from_csr(crow, col, weight.reshape(-1)[positions], weight.shape[1], bias)


# -- the modules: every kernel path against the dense product --------------------------------------------
@pytest.mark.parametrize("rows", [1, 8, 100, 1500])  # MKL addmv, MKL addmm, embedding_bag, the tiled SpMM
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_bias", [True, False])
def test_csr_module_equals_the_dense_product_at_every_row_count(rows: int, dtype, with_bias: bool) -> None:
    weight = _pruned_matrix(48, 40, 0.1, dtype=dtype)
    bias = torch.randn(48, dtype=dtype) if with_bias else None
    module = _module(CSRLinear, weight, bias)
    x = torch.randn(rows, 40, dtype=dtype)
    expected = F.linear(x, weight, bias)
    assert module.nnz == int((weight != 0).sum())
    torch.testing.assert_close(module(x), expected)
    torch.testing.assert_close(module(x.reshape(rows, 1, 40)), expected.reshape(rows, 1, 48))  # leading dims kept
    assert module(x).is_contiguous()


@pytest.mark.parametrize("rows", [1, 8, 100, 1500])
def test_condensed_module_equals_the_dense_product(rows: int) -> None:
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(32, 24, generator=g).argsort(dim=1)[:, :3]  # 3 of 24 inputs per output
    weight = torch.zeros(32, 24).scatter_(1, keep, torch.randn(32, 3, generator=g))
    module = _module(CondensedLinear, weight, torch.randn(32, generator=g))
    assert module.indices.shape == (32, 3) and module.values.shape == (32, 3)
    assert module.indices.dtype == torch.int32
    x = torch.randn(rows, 24, generator=g)
    torch.testing.assert_close(module(x), F.linear(x, weight, module.bias))
    torch.testing.assert_close(module.to_dense(), weight)


def test_half_precision_modules_compute_on_embedding_bag_and_follow_autocast() -> None:
    weight = _pruned_matrix(48, 40, 0.1)
    module = _module(CSRLinear, weight, torch.randn(48))
    x = torch.randn(5, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
        reference = nn.functional.linear(x, weight, module.bias)
    assert out.dtype == reference.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), F.linear(x, weight, module.bias), atol=2e-2, rtol=2e-2)
    half = copy.deepcopy(module).to(torch.bfloat16)  # MKL and the tiled SpMM have no bfloat16 kernels
    for rows in (x, torch.randn(1500, 40)):  # embedding_bag; densified at 1,500 rows
        expected = F.linear(rows, weight, module.bias)
        torch.testing.assert_close(half(rows.bfloat16()).float(), expected, atol=5e-2, rtol=2e-2)


def test_empty_rows_and_an_empty_layer_give_the_bias() -> None:
    weight = torch.zeros(6, 5)
    weight[2, 1] = 3.0
    bias = torch.arange(6.0)
    for x in (torch.randn(1, 5), torch.randn(40, 5), torch.randn(1100, 5)):
        torch.testing.assert_close(_module(CSRLinear, weight, bias)(x), F.linear(x, weight, bias))
        torch.testing.assert_close(_module(CSRLinear, torch.zeros(6, 5), bias)(x), bias.expand(len(x), 6))


def test_modules_copy_and_pickle_without_their_kernel_cache() -> None:
    module = _module(CSRLinear, _pruned_matrix(16, 12, 0.2), None)
    x = torch.randn(3, 12)
    expected = module(x)  # builds the cached CSR tensor
    torch.testing.assert_close(copy.deepcopy(module)(x), expected)
    torch.testing.assert_close(pickle.loads(pickle.dumps(module))(x), expected)


# -- merge_and_unload(sparse=...) ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "sparse", "layout"),
    [
        (PRUNED_90, "csr", CSRLinear),
        (PRUNED_90, "auto", CSRLinear),
        (ONE_OF_EIGHT, "condensed", CondensedLinear),
        (ONE_OF_EIGHT, "auto", CondensedLinear),
        (ONE_OF_EIGHT, "csr", CSRLinear),
        (TWO_OF_FOUR, "condensed", CondensedLinear),
    ],
)
@pytest.mark.parametrize("model_fn", [tiny_bert, tiny_gpt2], ids=["bert-linear", "gpt2-conv1d"])
def test_sparse_merge_equals_the_dense_merge(config, sparse: str, layout: type, model_fn) -> None:
    base = model_fn()
    dense = _merged(base, config, None)
    merged = _merged(base, config, sparse)
    layers = _sparse_layers(merged)
    drt_names = [name for name, _ in get_drt_model(copy.deepcopy(base), config).drt_layers()]
    assert sorted(layers) == sorted(drt_names)
    assert all(type(layer) is layout for layer in layers.values())
    for name, layer in layers.items():
        dense_layer = dense.get_submodule(name)
        matrix = dense_layer.weight.t() if isinstance(dense_layer, Conv1D) else dense_layer.weight
        torch.testing.assert_close(layer.to_dense(), matrix.detach(), rtol=0, atol=0)
        assert layer.nnz == int((matrix != 0).sum())
    g = torch.Generator().manual_seed(0)
    for batch, length in ((1, 1), (1, 16), (4, 16), (32, 32)):  # rows 1, 16, 64, 1,024: every kernel path
        ids = torch.randint(0, 64, (batch, length), generator=g)
        torch.testing.assert_close(_logits(merged, ids), _logits(dense, ids), atol=1e-5, rtol=1e-5)


def test_auto_keeps_dense_layers_above_its_density_on_cpu() -> None:
    merged = _merged(tiny_bert(), TWO_OF_FOUR, "auto")  # density 0.5 > AUTO_MAX_DENSITY
    assert not _sparse_layers(merged)
    assert type(merged.bert.encoder.layer[0].attention.self.query) is nn.Linear


def test_supermask_layers_merge_to_their_kept_weights() -> None:
    base = tiny_bert()
    drt = get_drt_model(copy.deepcopy(base), SupermaskConfig(density=0.1))
    drt.eval()
    dense = copy.deepcopy(drt).merge_and_unload()
    merged = drt.merge_and_unload(sparse="csr")
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    assert _sparse_layers(merged)
    torch.testing.assert_close(_logits(merged, ids), _logits(dense, ids), atol=1e-5, rtol=1e-5)


def test_conv2d_layers_merge_densely_beside_sparse_linear_ones() -> None:
    base = tiny_convnet()
    drt = get_drt_model(copy.deepcopy(base), RandomConfig(density=0.1, mode="prune", target_modules=["conv1", "fc"]))
    dense = copy.deepcopy(drt).merge_and_unload()
    merged = drt.merge_and_unload(sparse="csr")
    assert type(merged.conv1) is nn.Conv2d and type(merged.fc) is CSRLinear
    x = torch.randn(2, 2, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), dense(x))


@pytest.mark.parametrize(
    "config",
    [RandomConfig(density=0.1), DCTSparseConfig(density=0.1)],
    ids=["freeze-mode", "dct-sparse"],
)
def test_sparse_needs_pruned_layers(config) -> None:
    drt = get_drt_model(tiny_bert(), config)
    with pytest.raises(ValueError, match=r"no layer of this adapter is a pruned nn\.Linear or Conv1D"):
        drt.merge_and_unload(sparse="auto")
    assert list(drt.drt_layers())  # nothing changed


def test_an_unknown_layout_is_refused_naming_the_choices() -> None:
    drt = get_drt_model(tiny_bert(), PRUNED_90)
    with pytest.raises(ValueError, match=r"sparse='coo' is not supported; use one of \['auto', 'csr', 'condensed'"):
        drt.merge_and_unload(sparse="coo")


def test_condensed_refuses_uneven_rows_and_leaves_the_model_as_it_was() -> None:
    drt = get_drt_model(tiny_bert(), PRUNED_90)
    layers_before = list(drt.drt_layers())
    with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.0\..*same number of kept inputs in every output"):
        drt.merge_and_unload(sparse="condensed")
    assert [layer for _, layer in drt.drt_layers()] == [layer for _, layer in layers_before]
    assert _sparse_layers(drt.merge_and_unload(sparse="csr"))


def test_semi_structured_refuses_other_masks_and_non_cuda_devices() -> None:
    """The semi-structured path itself needs a CUDA GPU (compute capability >= 8.0), which the tests lack."""
    with pytest.raises(ValueError, match="needs a 2:4 mask"):
        get_drt_model(tiny_bert(), ONE_OF_EIGHT).merge_and_unload(sparse="semi-structured")
    drt = get_drt_model(tiny_bert(), TWO_OF_FOUR)
    with pytest.raises(ValueError, match="'semi-structured' is not available: it runs on CUDA GPUs only"):
        drt.merge_and_unload(sparse="semi-structured")
    assert list(drt.drt_layers())


def test_a_semi_structured_layer_loaded_off_the_gpu_computes_with_the_condensed_kernels() -> None:
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(8, 4, 4, generator=g).argsort(dim=-1)[..., :2].sort(dim=-1).values + 4 * torch.arange(4)[:, None]
    weight = torch.zeros(8, 16).scatter_(1, keep.reshape(8, 8), torch.randn(8, 8, generator=g))
    condensed = _module(CondensedLinear, weight, torch.randn(8, generator=g))
    module = empty_sparse_module({**condensed.describe(), "layout": "semi-structured"})
    assert type(module) is SemiStructuredLinear
    module.load_state_dict(condensed.state_dict())
    x = torch.randn(3, 16, generator=g)
    torch.testing.assert_close(module(x), F.linear(x, weight, condensed.bias))


# -- save_sparse_model / load_sparse_model ---------------------------------------------------------------
def _file_bytes(folder: str, name: str) -> int:
    return os.path.getsize(os.path.join(folder, name))


def test_save_load_gives_identical_outputs_in_proportionally_smaller_files(tmp_path) -> None:
    # linear weights dominate this BERT (as in real ones), so the file shrinks with them; the loaded model gets
    # transformers' default attention (sdpa), as from_pretrained would give it
    base = tiny_bert(
        vocab_size=16, hidden_size=64, intermediate_size=256, max_position_embeddings=16, attn_implementation="sdpa"
    )
    dense = _merged(base, PRUNED_90, None)
    merged = _merged(base, PRUNED_90, "auto")
    dense.save_pretrained(tmp_path / "dense")
    save_sparse_model(merged, tmp_path / "sparse")
    assert sorted(os.listdir(tmp_path / "sparse")) == ["config.json", "sparse_layout.json", SPARSE_WEIGHTS_NAME]
    ratio = _file_bytes(tmp_path / "sparse", SPARSE_WEIGHTS_NAME) / _file_bytes(tmp_path / "dense", "model.safetensors")
    assert ratio < 0.3
    with safe_open(tmp_path / "sparse" / SPARSE_WEIGHTS_NAME, framework="pt") as handle:
        assert handle.get_slice("bert.encoder.layer.0.output.dense.col_indices").get_dtype() == "I16"
    loaded = load_sparse_model(tmp_path / "sparse")
    assert type(loaded) is type(base) and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert sorted(_sparse_layers(loaded)) == sorted(_sparse_layers(merged))
    assert all(layer.col_indices.dtype == torch.int32 for layer in _sparse_layers(loaded).values())
    ids = torch.randint(0, 16, (3, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(loaded, ids), _logits(merged, ids), rtol=0, atol=0)
    torch.testing.assert_close(_logits(loaded, ids), _logits(dense, ids), atol=1e-5, rtol=1e-5)
    # by an Auto class too
    auto = load_sparse_model(tmp_path / "sparse", model_class=AutoModelForSequenceClassification)
    torch.testing.assert_close(_logits(auto, ids), _logits(merged, ids), rtol=0, atol=0)


def test_gpt2_condensed_round_trip_keeps_the_tied_head(tmp_path) -> None:
    merged = _merged(tiny_gpt2(), ONE_OF_EIGHT, "auto")
    assert all(type(layer) is CondensedLinear for layer in _sparse_layers(merged).values())
    save_sparse_model(merged, tmp_path)
    loaded = load_sparse_model(tmp_path)
    loaded.set_attn_implementation("eager")  # as tiny_gpt2's; loading gives transformers' default
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(loaded, ids), _logits(merged, ids), rtol=0, atol=0)


def test_a_bfloat16_model_loads_back_in_bfloat16(tmp_path) -> None:
    merged = _merged(tiny_bert(attn_implementation="sdpa"), PRUNED_90, "csr").to(torch.bfloat16)
    save_sparse_model(merged, tmp_path)
    loaded = load_sparse_model(tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(loaded, ids), _logits(merged, ids), rtol=0, atol=0)


def test_transformers_from_pretrained_refuses_the_folder(tmp_path) -> None:
    save_sparse_model(_merged(tiny_bert(), PRUNED_90, "csr"), tmp_path)
    with pytest.raises(OSError, match=r"model\.safetensors"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path)


def test_saving_refuses_dense_and_non_transformers_models(tmp_path) -> None:
    with pytest.raises(ValueError, match="no sparse layers"):
        save_sparse_model(tiny_bert(), tmp_path)
    merged = _merged(tiny_convnet(), RandomConfig(density=0.1, mode="prune", target_modules=["fc"]), "csr")
    with pytest.raises(TypeError, match="has no transformers config"):
        save_sparse_model(merged, tmp_path)


def _rewrite(folder, edit) -> None:
    """Apply ``edit(tensors, metadata)`` to the saved file and record the checksum of the result."""
    file = os.path.join(folder, SPARSE_WEIGHTS_NAME)
    with safe_open(file, framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    edit(tensors, metadata)
    metadata["drt_checksum"] = tensors_checksum(tensors)
    save_file(tensors, file, metadata=metadata)


QUERY = "bert.encoder.layer.0.attention.self.query"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t, m: t.pop(f"{QUERY}.values"), r"tensors 1 missing \(\['bert.encoder.layer.0.attention.self.query"),
        (lambda t, m: t.update(extra=torch.zeros(2)), r"1 unexpected \(\['extra'\]\)"),
        (
            lambda t, m: t.update({"bert.pooler.dense.bias": torch.zeros(3)}),
            r"1 of another shape \(\['bert.pooler.dense.bias: \(3,\) in the file, \(32,\) in the model'\]\)",
        ),
        (
            lambda t, m: m.update(sparse_layers=m["sparse_layers"].replace('"csr"', '"coo"', 1)),
            r"layout='coo' is not supported",
        ),
        (
            lambda t, m: m.update(sparse_layers=m["sparse_layers"].replace(QUERY, "bert.encoder.layer.0.nothing")),
            r"sparse layer bert\.encoder\.layer\.0\.nothing of \[out, in\] \(32, 32\) where .* has nothing",
        ),
    ],
    ids=["missing", "extra", "shape", "layout", "layer"],
)
def test_loading_refuses_files_that_do_not_fit(tmp_path, edit, message: str) -> None:
    save_sparse_model(_merged(tiny_bert(), PRUNED_90, "csr"), tmp_path)
    _rewrite(tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        load_sparse_model(tmp_path)


def test_loading_refuses_another_model_class_and_corrupt_files(tmp_path) -> None:
    save_sparse_model(_merged(tiny_bert(), PRUNED_90, "csr"), tmp_path)
    with pytest.raises(ValueError, match=r"bert\.pooler\.dense .* where the BertForMaskedLM built from its config"):
        load_sparse_model(tmp_path, model_class=BertForMaskedLM)  # no pooler
    with pytest.raises(ValueError, match=r"holds a BertForSequenceClassification; model_class=.*GPT2LMHeadModel"):
        load_sparse_model(tmp_path, model_class=GPT2LMHeadModel)
    with pytest.raises(FileNotFoundError, match=SPARSE_WEIGHTS_NAME):
        load_sparse_model(tmp_path / "missing")
    file = tmp_path / SPARSE_WEIGHTS_NAME
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="is corrupted"):
        load_sparse_model(tmp_path)
