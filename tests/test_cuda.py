"""The CUDA path: the DRT layer, its SDDMM kernels and training steps on one GPU, against float32 references.

Skipped without a CUDA device; ``scripts/gpu_check.sh`` runs these (and ``tests/test_triton.py``
compiled) on one. Every SDDMM kernel choice of :data:`~drt_peft.layer.ops.CUDA_SDDMM_KERNELS` runs
the same checks: the layer under bfloat16 autocast (float32 and bfloat16 bases) against a float32
dense reference, no weight-sized gradient (by the existing CPU pattern and by the GPU's allocator),
and a model's training steps equal to the same steps on CPU.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from conftest import adamw, random_lm_batch, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

from drt_peft import DRTLayer, RandomConfig, get_drt_model
from drt_peft.layer import layer as layer_module
from drt_peft.layer import ops

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh runs these on one)"
)

CUDA = torch.device("cuda")
#: Relative error allowed against float32 under bfloat16 autocast (as in tests/test_mixed_precision.py).
BF16_TOLERANCE = 4 * torch.finfo(torch.bfloat16).eps


@pytest.fixture(params=ops.CUDA_SDDMM_KERNELS)
def kernel(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each CUDA SDDMM kernel in turn (the Triton one where triton is installed); the default again after."""
    if request.param == "triton":
        pytest.importorskip("triton", reason="the Triton kernel needs the optional triton package")
    ops.set_cuda_sddmm_kernel(request.param)
    yield request.param
    ops.set_cuda_sddmm_kernel("sampled_addmm")


def _module(kind: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    module = nn.Linear(256, 192) if kind == "linear" else Conv1D(192, 256)  # both: 256 inputs → 192 outputs
    return module.to(CUDA, dtype)


def _indices(numel: int, density: float, seed: int = 1) -> torch.Tensor:
    k = max(1, int(density * numel))
    return torch.randperm(numel, generator=torch.Generator().manual_seed(seed))[:k].sort().values


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.detach().double(), reference.detach().double()
    return float((value - reference).norm() / reference.norm().clamp_min(1e-30))


def _refuse_dense_gradient(monkeypatch: pytest.MonkeyPatch, layer: DRTLayer) -> None:
    """The CPU tests' pattern: the op's dense weight gradient raises if anything asks for it."""

    def refuse(*args: object) -> None:
        raise AssertionError("a dense weight gradient was formed")

    monkeypatch.setattr(layer.op, "grad_weight", refuse)


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("density", [0.2, 0.02])  # 0.02: a CSR layer on CPU, dense products on CUDA
@pytest.mark.parametrize("mode", ["freeze", "prune"])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_the_layer_under_bf16_autocast_matches_a_float32_dense_reference(
    kind: str, mode: str, density: float, base_dtype: torch.dtype, kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = _module(kind, base_dtype)
    indices = _indices(module.weight.numel(), density)
    layer = DRTLayer(module, indices, mode, train_bias=True)
    layer.upcast_adapter_tensors()  # float32 ϑ (and bias) on a bfloat16 base, as get_drt_model stores them
    with torch.no_grad():
        layer.drt_values.add_(0.05)
    assert not layer.sparse_kernels  # the CSR kernels are CPU-only (CSR_DEVICE_TYPES)
    _refuse_dense_gradient(monkeypatch, layer)

    theta = layer.effective_weight().detach().float().clone().requires_grad_(True)
    bias = module.bias.detach().float().clone().requires_grad_(True)
    g = torch.Generator(device=CUDA).manual_seed(2)
    x = torch.randn(4, 32, 256, device=CUDA, generator=g)
    x_ref = x.clone().requires_grad_(True)
    out_ref = layer.op.forward(x_ref, theta, bias)
    grad = torch.randn(out_ref.shape, device=CUDA, generator=g)
    (out_ref * grad).sum().backward()

    x_amp = x.clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = layer(x_amp)
    assert out.dtype == torch.bfloat16
    (out.float() * grad).sum().backward()
    assert _relative_error(out, out_ref) < BF16_TOLERANCE
    assert _relative_error(x_amp.grad, x_ref.grad) < BF16_TOLERANCE
    assert layer.drt_values.grad.dtype == torch.float32
    assert _relative_error(layer.drt_values.grad, theta.grad.reshape(-1)[indices.to(CUDA)]) < BF16_TOLERANCE
    assert _relative_error(module.bias.grad, bias.grad) < BF16_TOLERANCE
    assert module.weight.grad is None


def test_no_weight_sized_gradient_is_allocated(kernel: str) -> None:
    """What the GPU's allocator sees in one backward of a bfloat16 4096 × 4096 layer at 1% (64 tokens): the
    sampled kernels stay far below the weight's 32 MiB; ``"dense"`` forms it, transiently, by design."""
    torch.manual_seed(0)
    module = nn.Linear(4096, 4096, bias=False).to(CUDA, torch.bfloat16)
    layer = DRTLayer(module, _indices(module.weight.numel(), 0.01), "freeze")
    layer.upcast_adapter_tensors()
    x = torch.randn(64, 4096, device=CUDA, dtype=torch.bfloat16)
    weight_bytes = module.weight.numel() * module.weight.element_size()
    layer(x).float().sum().backward()  # warm-up: cuBLAS and cuSPARSE workspaces, the cached pattern
    layer.drt_values.grad = None
    torch.cuda.synchronize()
    out = layer(x).float().sum()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out.backward()
    torch.cuda.synchronize()
    added = torch.cuda.max_memory_allocated() - before
    if kernel == "dense":
        assert added >= weight_bytes
    else:
        assert added < weight_bytes // 4, f"{kernel}: the backward allocated {added:,} bytes"


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_a_pruned_csr_layer_moved_to_cuda_runs_dense_products_and_back_on_cpu_csr_ones(kind: str) -> None:
    torch.manual_seed(0)
    module = nn.Linear(256, 192) if kind == "linear" else Conv1D(192, 256)
    layer = DRTLayer(module, _indices(module.weight.numel(), 0.02), "prune", train_bias=True)
    with torch.no_grad():
        layer.drt_values.add_(0.05)
    assert layer.sparse_kernels
    x = torch.randn(4, 32, 256, generator=torch.Generator().manual_seed(2))
    grad = torch.randn(4, 32, 192, generator=torch.Generator().manual_seed(3))
    x_cpu = x.clone().requires_grad_(True)
    out_cpu = layer(x_cpu)
    out_cpu.backward(grad)
    expected = (out_cpu.detach(), x_cpu.grad, layer.drt_values.grad.clone(), module.bias.grad.clone())
    layer.drt_values.grad = module.bias.grad = None

    layer.to(CUDA)
    assert not layer.sparse_kernels
    x_gpu = x.to(CUDA).requires_grad_(True)
    out_gpu = layer(x_gpu)
    out_gpu.backward(grad.to(CUDA))
    got = (out_gpu.detach(), x_gpu.grad, layer.drt_values.grad, module.bias.grad)
    for name, a, b in zip(("output", "input gradient", "ϑ gradient", "bias gradient"), got, expected, strict=True):
        assert torch.allclose(a.cpu(), b, rtol=1e-4, atol=1e-5), name
    layer.cpu()
    assert layer.sparse_kernels and layer.drt_effective.numel() == 0


def test_the_csr_kernels_also_run_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """cuSPARSE's CSR products (what benchmarks/gpu_step.py times against dense ones) give the dense results."""
    monkeypatch.setattr(layer_module, "CSR_DEVICE_TYPES", ("cpu", "cuda"))
    module = _module("linear", torch.float32)
    indices = _indices(module.weight.numel(), 0.02)
    layer = DRTLayer(module, indices, "prune", train_bias=True)
    assert layer.sparse_kernels
    theta = layer.effective_weight().detach().clone().requires_grad_(True)
    x = torch.randn(4, 32, 256, device=CUDA, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, ref = layer(x), nn.functional.linear(x_ref, theta, module.bias.detach())
    out.sum().backward()
    ref.sum().backward()
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    assert torch.allclose(layer.drt_values.grad, theta.grad.reshape(-1)[indices.to(CUDA)], rtol=1e-4, atol=1e-4)


def _train(model: nn.Module, batches: list[dict[str, torch.Tensor]], optimizer: torch.optim.Optimizer) -> list[float]:
    """One optimizer step per batch; the losses."""
    model.train()
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(("mode", "density"), [("freeze", 0.1), ("prune", 0.1), ("prune", 0.02)])
def test_training_steps_on_cuda_equal_those_on_cpu(mode: str, density: float, kernel: str) -> None:
    """A tiny Llama (tied embeddings) in float32: ϑ after three SGD steps as on CPU, where the pruned 2% model runs
    on CSR kernels and the GPU's on dense products. (SGD: Adam's normalised steps would turn rounding differences
    in gradients near zero into steps of the learning rate.)"""
    config = RandomConfig(density=density, mode=mode, target_modules="all-linear")
    g = torch.Generator().manual_seed(0)
    batches = [random_lm_batch(g) for _ in range(3)]
    on_cpu = get_drt_model(tiny_llama(), config)
    on_gpu = copy.deepcopy(on_cpu).to(CUDA)
    initial = {name: layer.drt_values.detach().clone() for name, layer in on_cpu.drt_layers()}
    _train(on_cpu, batches, torch.optim.SGD(on_cpu.parameters(), lr=0.5))
    gpu_batches = [{k: v.to(CUDA) for k, v in batch.items()} for batch in batches]
    _train(on_gpu, gpu_batches, torch.optim.SGD(on_gpu.parameters(), lr=0.5))
    for (name, a), (_, b) in zip(on_gpu.drt_layers(), on_cpu.drt_layers(), strict=True):
        assert not torch.equal(b.drt_values, initial[name]), name
        assert torch.allclose(a.drt_values.detach().cpu(), b.drt_values.detach(), rtol=1e-4, atol=1e-5), name


@pytest.mark.parametrize("mode", ["freeze", "prune"])
def test_a_bfloat16_model_trains_under_autocast(mode: str, kernel: str) -> None:
    """The set-up of benchmarks/gpu_step.py in small: a bfloat16 base, float32 ϑ, autocast, fused AdamW."""
    model = get_drt_model(tiny_llama().to(CUDA, torch.bfloat16), RandomConfig(density=0.05, mode=mode))
    assert all(layer.drt_values.dtype == torch.float32 for _, layer in model.drt_layers())
    batch = {k: v.to(CUDA) for k, v in random_lm_batch(torch.Generator().manual_seed(0), size=8, length=16).items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses = _train(model, [batch] * 12, adamw(model, lr=3e-2, fused=True))
    assert losses[-1] < losses[0] - 0.05, losses  # on CPU: 4.17 → 4.00 (freeze), 4.18 → 4.05 (prune)
    for _, layer in model.drt_layers():
        assert layer.base_layer.weight.grad is None
