"""Mixed precision and dtypes: autocast training, float32 adapter values on half bases, the fingerprint across dtypes.

CPU autocast runs bfloat16 and float16 here; CUDA autocast goes through the same code (the layers
read the autocast state of the input's device). Half-precision bases are float16 where CPU kernels
have it (tiny BERT trains in float16 on CPU).
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable

import pytest
import torch
from conftest import (
    Parity,
    adamw,
    assert_save_load_roundtrip,
    cpu_training_args,
    random_bert_batch,
    tiny_bert,
    tiny_convnet,
    tiny_gpt2,
    train_steps,
)
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import Trainer
from transformers.pytorch_utils import Conv1D

from drt_peft import (
    DRTConfig,
    DRTModel,
    FixedClassifierConfig,
    IntrinsicDimensionConfig,
    LotteryTicketConfig,
    RandomConfig,
    SupermaskConfig,
    get_drt_model,
)
from drt_peft.base_weights import BaseProbe
from drt_peft.checkpoint.io import WEIGHTS_NAME, tensors_checksum
from drt_peft.layer import DRTLayer, ops
from drt_peft.layer.dct import DCTSparseLayer
from drt_peft.layer.fixed_classifier import FixedClassifierLayer
from drt_peft.layer.ops import weight_op
from drt_peft.layer.partly_pruned import PartlyPrunedLayer
from drt_peft.layer.projected import ProjectedLayer, share_projection
from drt_peft.layer.supermask import SupermaskLayer
from drt_peft.lottery import STATE_NAME, _load_state
from drt_peft.targeting import Target

AMP_DTYPES = [torch.bfloat16, torch.float16]


def _modules() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    return {
        "linear": (nn.Linear(40, 30), (3, 5, 40)),
        "conv1d": (Conv1D(30, 40), (3, 5, 40)),
        "conv2d": (nn.Conv2d(4, 6, 3, padding=1), (2, 4, 7, 7)),
        "grouped_conv2d": (nn.Conv2d(4, 8, 3, padding=1, groups=2), (2, 4, 7, 7)),
    }


def _indices(numel: int, fraction: float, seed: int = 1) -> torch.Tensor:
    k = max(1, int(fraction * numel))
    return torch.randperm(numel, generator=torch.Generator().manual_seed(seed))[:k].sort().values


def _partly_pruned(module: nn.Module) -> DRTLayer:
    numel = module.weight.numel()
    order = torch.randperm(numel, generator=torch.Generator().manual_seed(3))
    layer = PartlyPrunedLayer(module, order[: numel // 5].sort().values, train_bias=True)
    layer.prune(order[numel // 5 : numel // 2].sort().values)
    return layer


def _supermask(variant: str) -> Callable[[nn.Module], DRTLayer]:
    def build(module: nn.Module) -> DRTLayer:
        layer = SupermaskLayer(module, _indices(module.weight.numel(), 0.3), variant, train_bias=True)
        layer.seed_scores(0, "layer")
        return layer.train()

    return build


def _projected(module: nn.Module) -> DRTLayer:
    layer = ProjectedLayer(module, train_bias=True)
    share_projection([("layer", layer)], 16, seed=0)
    with torch.no_grad():
        layer.drt_values.normal_(0, 1, generator=torch.Generator().manual_seed(4))
    return layer


def _fixed_classifier(module: nn.Module) -> DRTLayer:
    layer = FixedClassifierLayer(module, train_bias=True, temperature=1.5)
    layer.draw_fixed_weight(0, "layer")
    return layer


#: name → (builder, module kinds it supports); "prune_csr" is at the CSR kernels' density.
LAYERS: dict[str, tuple[Callable[[nn.Module], DRTLayer], tuple[str, ...]]] = {
    "freeze": (lambda m: DRTLayer(m, _indices(m.weight.numel(), 0.2), "freeze", True), tuple(_modules())),
    "prune": (lambda m: DRTLayer(m, _indices(m.weight.numel(), 0.2), "prune", True), tuple(_modules())),
    "prune_csr": (lambda m: DRTLayer(m, _indices(m.weight.numel(), 0.02), "prune", True), ("linear", "conv1d")),
    "partly_pruned": (_partly_pruned, tuple(_modules())),
    "dct_sparse": (lambda m: DCTSparseLayer(m, _indices(m.weight.numel(), 0.02), True), ("linear", "conv1d")),
    "supermask_top_k": (_supermask("top_k"), tuple(_modules())),
    "supermask_signed": (_supermask("signed"), tuple(_modules())),
    "supermask_bernoulli": (_supermask("bernoulli"), tuple(_modules())),
    "projected": (_projected, tuple(_modules())),
    "fixed_classifier": (_fixed_classifier, ("linear",)),
}
CASES = [(layer, kind) for layer, (_, kinds) in LAYERS.items() for kind in kinds]


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.detach().double(), reference.detach().double()
    return float((value - reference).norm() / reference.norm().clamp_min(1e-30))


def _trainable(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in layer.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("amp_dtype", AMP_DTYPES)
@pytest.mark.parametrize(("layer_name", "kind"), CASES)
def test_layers_train_under_autocast_with_float32_gradients(
    layer_name: str, kind: str, amp_dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    module, shape = _modules()[kind]
    build, _ = LAYERS[layer_name]
    layer = build(module)
    reference = copy.deepcopy(layer)
    if layer_name == "prune_csr" or layer_name == "dct_sparse":
        assert layer.sparse_kernels
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    x_ref = x.clone().requires_grad_(True)
    out_ref = reference(x_ref)
    # ∂L/∂y correlated with y, so that scalar gradients (the fixed classifier's α: Σ ∂L/∂y · y/α) are sums
    # without heavy cancellation, which no half-precision forward could reproduce to bf16 accuracy
    noise = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(5))
    grad = out_ref.detach() + 0.5 * out_ref.detach().std() * noise
    (out_ref * grad).sum().backward()

    samples_gradient = type(layer) in (DRTLayer, PartlyPrunedLayer, DCTSparseLayer)
    if samples_gradient and kind != "grouped_conv2d":

        def refuse(*args: object) -> None:
            raise AssertionError("a dense weight gradient was formed")

        monkeypatch.setattr(layer.op, "grad_weight", refuse)
        monkeypatch.setattr(ops, "DENSE_GRADIENT_DENSITY", 1.0)  # these tiny layers are denser than the crossover
    x_amp = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=amp_dtype):
        out = layer(x_amp)
        plain = copy.deepcopy(module)(x)
    assert out.dtype == plain.dtype == amp_dtype  # what the plain module returns under autocast
    (out.float() * grad).sum().backward()

    tolerance = 4 * torch.finfo(amp_dtype).eps
    assert _relative_error(out, out_ref) < tolerance
    assert x_amp.grad.dtype == torch.float32
    assert _relative_error(x_amp.grad, x_ref.grad) < tolerance
    trained, expected = _trainable(layer), _trainable(reference)
    assert trained.keys() == expected.keys() and trained
    for name, param in trained.items():
        assert param.grad is not None and param.grad.dtype == param.dtype == torch.float32, name
        assert _relative_error(param.grad, expected[name].grad) < tolerance, name
    assert layer.base_layer.weight.grad is None


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_captured_dense_gradient_under_autocast_has_the_weight_dtype(kind: str) -> None:
    module, shape = _modules()[kind]
    layer = DRTLayer(module, _indices(module.weight.numel(), 0.2), "prune", True)
    reference = copy.deepcopy(layer)
    layer.capture_dense_grad = reference.capture_dense_grad = True
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    reference(x).sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().sum().backward()
    assert layer.dense_grad.dtype == torch.float32
    assert _relative_error(layer.dense_grad, reference.dense_grad) < 0.03
    assert _relative_error(layer.drt_values.grad, reference.drt_values.grad) < 0.03


def _model_cases() -> list[tuple[str, Callable[[], nn.Module], DRTConfig]]:
    convs = ["conv1", "depthwise", "conv2", "fc"]
    return [
        ("bert_freeze", tiny_bert, RandomConfig(density=0.1)),
        ("bert_prune_csr", tiny_bert, RandomConfig(density=0.02, mode="prune", bias="all")),
        ("gpt2_prune_csr", tiny_gpt2, RandomConfig(density=0.02, mode="prune")),
        ("gpt2_freeze", tiny_gpt2, RandomConfig(density=0.1, bias="all")),
        ("convnet_freeze", tiny_convnet, RandomConfig(density=0.2, target_modules=convs)),
        ("convnet_prune", tiny_convnet, RandomConfig(density=0.2, mode="prune", target_modules=convs)),
        ("bert_supermask", tiny_bert, SupermaskConfig(density=0.5)),
        ("bert_intrinsic_dimension", tiny_bert, IntrinsicDimensionConfig(num_trainable=64)),
        ("bert_fixed_classifier", tiny_bert, FixedClassifierConfig(modules_to_save=["pooler"])),
    ]


def _loss(model: nn.Module, name: str, g: torch.Generator) -> torch.Tensor:
    if name.startswith("convnet"):
        x, y = torch.randn(4, 2, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g)
        return nn.functional.cross_entropy(model(x).float(), y)
    batch = random_bert_batch(g)
    if name.startswith("gpt2"):
        batch["labels"] = batch["input_ids"]
    return model(**batch).loss


def _without_dropout(model: nn.Module) -> nn.Module:
    """Train mode (the supermask trains its scores only there) with the same function in both runs."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model.train()


@pytest.mark.parametrize(("name", "factory", "config"), _model_cases(), ids=[case[0] for case in _model_cases()])
def test_models_train_under_autocast_like_float32(name: str, factory: Callable, config: DRTConfig) -> None:
    amp = _without_dropout(get_drt_model(factory(), config))
    reference = _without_dropout(get_drt_model(factory(), config))
    _loss(reference, name, torch.Generator().manual_seed(0)).backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _loss(amp, name, torch.Generator().manual_seed(0))
    loss.backward()
    expected = dict(reference.named_parameters())
    trained = [(n, p) for n, p in amp.named_parameters() if p.requires_grad]
    assert trained and all(p.grad.dtype == p.dtype == torch.float32 for _, p in trained)
    # over all trained tensors at once: some layers' gradients are ~1e-7 in a tiny random BERT, pure rounding
    grads = torch.cat([p.grad.reshape(-1) for _, p in trained])
    reference_grads = torch.cat([expected[n].grad.reshape(-1) for n, _ in trained])
    assert _relative_error(grads, reference_grads) < 0.05


@pytest.mark.parametrize(("mode", "density"), [("freeze", 0.1), ("prune", 0.02)])
def test_trainer_with_bf16_on_cpu(mode: str, density: float, tmp_path) -> None:
    model = get_drt_model(tiny_bert(), RandomConfig(density=density, mode=mode, modules_to_save=["classifier"]))
    before = {name: layer.drt_values.detach().clone() for name, layer in model.drt_layers()}
    args = cpu_training_args(tmp_path, bf16=True, per_device_train_batch_size=8, max_steps=3, learning_rate=1e-2)
    trainer = Trainer(model=model, args=args, train_dataset=Parity(24))
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    for name, layer in model.drt_layers():
        assert layer.drt_values.dtype == torch.float32
        assert not torch.equal(layer.drt_values, before[name]), name


# -- float32 adapter values on half-precision bases --------------------------------------------


def _half_bert() -> nn.Module:
    return tiny_bert().half()


def test_float16_base_trains_float32_values_with_adamw() -> None:
    batches = [random_bert_batch(torch.Generator().manual_seed(i), size=2) for i in range(2)]
    model = get_drt_model(_half_bert(), RandomConfig(density=0.1))
    train_steps(model, batches, lr=1e-2)
    for name, layer in model.drt_layers():
        assert layer.base_layer.weight.dtype == layer.drt_base_values.dtype == torch.float16, name
        assert layer.drt_values.dtype == torch.float32, name
        assert torch.isfinite(layer.drt_values).all(), name
    # opting out keeps the values in the base dtype (where AdamW's eps=1e-8 underflows in float16)
    kept = get_drt_model(_half_bert(), RandomConfig(density=0.1, autocast_adapter_dtype=False))
    assert all(layer.drt_values.dtype == torch.float16 for _, layer in kept.drt_layers())


def test_float32_trainable_tensors_of_the_layer_subclasses_on_a_float16_base() -> None:
    supermask = get_drt_model(_half_bert(), SupermaskConfig(density=0.5))
    projected = get_drt_model(_half_bert(), IntrinsicDimensionConfig(num_trainable=64))
    fixed = get_drt_model(_half_bert(), FixedClassifierConfig())
    for model in (supermask, projected, fixed):
        trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert trained and all(p.dtype == torch.float32 for p in trained.values()), type(model.drt_config)
        losses = train_steps(model, [random_bert_batch(torch.Generator().manual_seed(0), size=2)] * 2, lr=1e-2)
        assert all(math.isfinite(loss) for loss in losses), type(model.drt_config)
        assert all(torch.isfinite(p).all() for p in trained.values()), type(model.drt_config)
    opted_out = get_drt_model(_half_bert(), SupermaskConfig(density=0.5, autocast_adapter_dtype=False))
    assert all(layer.scores.dtype == torch.float16 for _, layer in opted_out.drt_layers())


def test_update_indices_merge_and_unload_stay_exact_with_float32_values_on_a_float16_base() -> None:
    base = _half_bert()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_drt_model(base, RandomConfig(density=0.1))
    optimizer = adamw(model, lr=1e-2)
    train_steps(model, [random_bert_batch(torch.Generator().manual_seed(0), size=2)])
    name, layer = next(iter(model.drt_layers()))
    loss = _loss(model, "bert", torch.Generator().manual_seed(1))
    loss.backward()
    optimizer.step()
    kept_values = layer.drt_values.detach()[::2].clone()
    grown = torch.tensor(
        [i for i in range(layer.base_layer.weight.numel()) if i not in set(layer.drt_indices.tolist())]
    )
    indices = torch.cat([layer.drt_indices[::2], grown[:5]]).sort().values
    layer.update_indices(indices, optimizer)
    assert layer.drt_values.dtype == torch.float32
    assert optimizer.state[layer.drt_values]["exp_avg"].dtype == torch.float32
    flat_original = original[f"{name}.weight"].reshape(-1)
    where = torch.searchsorted(indices, grown[:5])
    assert torch.equal(layer.drt_values.detach()[where], flat_original[grown[:5]].float())  # grown at Θ(0), exactly
    assert torch.isin(kept_values, layer.drt_values.detach()).all()
    merged = copy.deepcopy(model).merge_and_unload()
    for layer_name, drt in model.drt_layers():
        weight = merged.get_submodule(layer_name).weight.reshape(-1)
        assert torch.equal(weight[drt.drt_indices], drt.drt_values.detach().half()), layer_name
        off = torch.ones_like(weight, dtype=torch.bool)
        off[drt.drt_indices] = False
        assert torch.equal(weight[off], original[f"{layer_name}.weight"].reshape(-1)[off]), layer_name
    restored = model.unload().state_dict()
    assert all(torch.equal(restored[k], original[k]) for k in original)


def test_values_are_saved_in_their_dtype_and_loaded_into_the_layers_dtype(tmp_path) -> None:
    batch = random_bert_batch(torch.Generator().manual_seed(0), size=2)
    model = get_drt_model(_half_bert(), RandomConfig(density=0.1))
    train_steps(model, [batch])
    loaded = assert_save_load_roundtrip(model, _half_bert(), {"input_ids": batch["input_ids"]}, tmp_path / "float32")
    with safe_open(os.path.join(tmp_path / "float32", WEIGHTS_NAME), framework="pt") as handle:
        assert handle.get_tensor("drt_values").dtype == torch.float32
    assert all(layer.drt_values.dtype == torch.float32 for _, layer in loaded.drt_layers())

    opted_out = get_drt_model(tiny_bert(), RandomConfig(density=0.1, autocast_adapter_dtype=False))
    train_steps(opted_out, [batch])
    opted_out.save_pretrained(tmp_path / "opted_out")
    onto_half = DRTModel.from_pretrained(_half_bert(), tmp_path / "opted_out")  # float32 values, float16 layer
    for (_, a), (_, b) in zip(opted_out.drt_layers(), onto_half.drt_layers(), strict=True):
        assert b.drt_values.dtype == torch.float16 and torch.equal(a.drt_values.detach().half(), b.drt_values)


def test_autocast_adapter_dtype_is_a_validated_config_field(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"autocast_adapter_dtype='no' must be True or False"):
        RandomConfig(density=0.1, autocast_adapter_dtype="no")
    config = RandomConfig(density=0.1, autocast_adapter_dtype=False)
    config.save_pretrained(tmp_path)
    assert DRTConfig.from_pretrained(tmp_path) == config
    old = config.to_dict()
    del old["autocast_adapter_dtype"]  # configs written before the field existed
    assert DRTConfig.from_dict(old).autocast_adapter_dtype is True


# -- the base fingerprint across dtypes ---------------------------------------------------------


def _saved(tmp_path, factory: Callable[[], nn.Module], config: DRTConfig, name: str = "adapter"):
    model = get_drt_model(factory(), config)
    folder = tmp_path / name
    model.save_pretrained(folder)
    return model, folder


@pytest.mark.parametrize("factory", [tiny_bert, tiny_gpt2], ids=["bert", "gpt2"])
def test_an_adapter_loads_on_the_same_weights_in_another_dtype(factory: Callable, tmp_path) -> None:
    model, folder = _saved(tmp_path, factory, RandomConfig(density=0.1))
    ids = random_bert_batch(torch.Generator().manual_seed(0))["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        loaded = DRTModel.from_pretrained(factory().to(dtype), folder)
        with torch.no_grad():
            logits = loaded(input_ids=ids).logits
        assert logits.dtype == dtype
        coarser = max(torch.finfo(dtype).eps, torch.finfo(torch.float32).eps)
        assert _relative_error(logits, expected) < 8 * coarser, dtype
    # bfloat16 and float16 both round the float32 weights: a bf16-saved adapter loads on the float16 copy
    DRTModel.from_pretrained(factory().bfloat16(), folder).save_pretrained(tmp_path / "bf16")
    DRTModel.from_pretrained(factory().half(), tmp_path / "bf16")


def test_seeded_and_convolutional_bases_load_across_dtypes(tmp_path) -> None:
    convs = ["conv1", "depthwise", "conv2", "fc"]
    _, folder = _saved(tmp_path, tiny_convnet, RandomConfig(density=0.2, target_modules=convs), "convnet")
    DRTModel.from_pretrained(tiny_convnet().bfloat16(), folder)
    _, seeded = _saved(tmp_path, tiny_bert, RandomConfig(density=0.1, base_init="seeded", seed=5), "seeded")
    DRTModel.from_pretrained(tiny_bert(seed=3).half(), seeded)  # Θ(0) regenerated from the seed, in float16


def test_other_weights_are_refused_in_any_dtype(tmp_path) -> None:
    _, folder = _saved(tmp_path, tiny_bert, RandomConfig(density=0.1))
    for other in (tiny_bert(seed=1), tiny_bert(seed=1).bfloat16(), tiny_bert(seed=1).half()):
        with pytest.raises(ValueError, match=r"base model mismatch: .*base_model_fingerprint='sha256:"):
            DRTModel.from_pretrained(other, folder)
    changed = tiny_bert()
    with torch.no_grad():
        changed.bert.encoder.layer[0].intermediate.dense.weight[3, :4] *= 1.001
    with pytest.raises(ValueError, match=r"the dtypes are the same, so the weights differ"):
        DRTModel.from_pretrained(changed, folder)
    with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.0\.attention\.self\.query has the probed value"):
        DRTModel.from_pretrained(tiny_bert(seed=1).bfloat16(), folder)


def test_adapters_without_a_probe_keep_the_exact_check(tmp_path) -> None:
    _, folder = _saved(tmp_path, tiny_bert, RandomConfig(density=0.1))
    file = os.path.join(folder, WEIGHTS_NAME)
    with safe_open(file, framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys() if not k.startswith("drt_base_probe")}
    del metadata["drt_base_probe_dtypes"]
    metadata["drt_checksum"] = tensors_checksum(tensors)
    save_file(tensors, file, metadata)  # as written before the probe existed
    DRTModel.from_pretrained(tiny_bert(), folder)
    with pytest.raises(ValueError, match=r"the adapter stores no base probe, so only the exact fingerprint"):
        DRTModel.from_pretrained(tiny_bert().bfloat16(), folder)
    config = json.loads(metadata["drt_config"])
    with pytest.raises(ValueError, match=r"base model mismatch"):  # a config alone carries no probe
        get_drt_model(tiny_bert().half(), DRTConfig.from_dict(config))


def test_probe_tolerates_rounding_only() -> None:
    module = nn.Linear(64, 64)
    targets = [Target("layer", module, weight_op(module))]
    probe = BaseProbe.of(targets, seed=0)
    assert probe.values.shape == (1, 32)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        copy_ = copy.deepcopy(module).to(dtype)
        assert probe.mismatch(BaseProbe.of([Target("layer", copy_, weight_op(copy_))], seed=0), ["layer"]) is None
    nudged = copy.deepcopy(module).bfloat16()
    with torch.no_grad():
        nudged.weight.mul_(1.05)  # every value off by 5%: beyond bfloat16's rounding
    reason = probe.mismatch(BaseProbe.of([Target("layer", nudged, weight_op(nudged))], seed=0), ["layer"])
    assert reason is not None and "layer has the probed value" in reason


def test_a_lottery_search_recorded_before_the_field_existed_resumes(tmp_path) -> None:
    config = LotteryTicketConfig(density=0.5)
    recorded = config.to_dict()
    del recorded["autocast_adapter_dtype"]
    (tmp_path / STATE_NAME).write_text(json.dumps({"config": recorded, "densities": [0.5], "rounds": []}))
    assert _load_state(str(tmp_path), config, [0.5])["config"] == recorded
    with pytest.raises(ValueError, match=r"fields \['autocast_adapter_dtype'\] differ"):
        _load_state(str(tmp_path), LotteryTicketConfig(density=0.5, autocast_adapter_dtype=False), [0.5])
