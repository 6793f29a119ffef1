"""The embedding layer: exact forward, sampled backward equal to dense autograd."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from drt_peft import DRTLayer, RandomConfig, get_drt_model
from drt_peft.layer import layer as layer_module
from drt_peft.layer import ops
from drt_peft.layer.frozen_decay import FrozenDecayLayer
from drt_peft.layer.ops import SampledWeightFunction, csr_pattern, dense_sddmm, sddmm, weight_op


def _modules() -> dict[str, tuple[nn.Module, tuple[int, ...], int]]:
    """Module, input shape and d; the ``-sparse`` ones are below CSR_MAX_DENSITY (CSR kernels when pruned)."""
    torch.manual_seed(0)
    return {
        "linear": (nn.Linear(6, 5), (3, 4, 6), 7),
        "conv1d": (Conv1D(5, 6), (3, 4, 6), 7),
        "linear-sparse": (nn.Linear(40, 30), (3, 4, 40), 20),
        "conv1d-sparse": (Conv1D(30, 40), (3, 4, 40), 20),
        "conv2d": (nn.Conv2d(3, 4, 3, padding=1, stride=2), (2, 3, 6, 5), 7),
        "conv2d-grouped": (nn.Conv2d(4, 4, 3, padding=1, groups=2), (2, 4, 5, 5), 7),
    }


KINDS = list(_modules())


@pytest.fixture(params=["sddmm", "dense"])
def gradient_kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test with the trained values' gradient formed by SDDMM, then by the dense product and gather."""
    monkeypatch.setattr(ops, "DENSE_GRADIENT_DENSITY", 1.0 if request.param == "sddmm" else 0.0)
    return request.param


def _expected_kernel(gradient_kernel: str, kind: str) -> str:
    return "dense" if gradient_kernel == "dense" or kind == "conv2d-grouped" else "tiled"


def _random_indices(numel: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randperm(numel, generator=torch.Generator().manual_seed(seed))[:d].sort().values


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["freeze", "prune"])
def test_gradients_match_dense_autograd(kind: str, mode: str, gradient_kernel: str) -> None:
    module, x_shape, d = _modules()[kind]
    module = module.double()
    original = module.weight.detach().clone()
    indices = _random_indices(original.numel(), d)
    layer = DRTLayer(module, indices, mode, train_bias=True)
    assert layer.sparse_kernels == (mode == "prune" and kind.endswith("-sparse"))
    with torch.no_grad():
        layer.drt_values.add_(torch.randn(d, dtype=torch.float64))
    x = torch.randn(x_shape, dtype=torch.float64, requires_grad=True)

    # forward is exact: Θ equals the base (or zero) with ϑ at ψ
    expected_weight = (original.clone() if mode == "freeze" else torch.zeros_like(original)).reshape(-1)
    expected_weight[indices] = layer.drt_values.detach()
    out = layer(x)
    assert torch.equal(layer.effective_weight().reshape(-1), expected_weight)

    # gradients equal dense autograd's at ψ (and dense input/bias gradients)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    dense_w = expected_weight.reshape(original.shape).clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    bias_ref = module.bias.detach().clone().requires_grad_(True)
    ref = layer.op.forward(x_ref, dense_w, bias_ref)
    ref.backward(grad_out)
    assert torch.allclose(out, ref)
    assert torch.allclose(layer.drt_values.grad, dense_w.grad.reshape(-1)[indices])
    assert torch.allclose(x.grad, x_ref.grad)
    assert torch.allclose(module.bias.grad, bias_ref.grad)
    assert module.weight.grad is None
    assert layer.op.last_grad_kernel == _expected_kernel(gradient_kernel, kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["freeze", "prune"])
def test_gradcheck(kind: str, mode: str, gradient_kernel: str) -> None:
    module, x_shape, _ = _modules()[kind]
    layer = DRTLayer(module.double(), _random_indices(module.weight.numel(), 5), mode, train_bias=True)
    x = torch.randn(x_shape, dtype=torch.float64, requires_grad=True)

    def f(x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            layer.drt_values.copy_(values)
        product, pattern = layer._product(), layer._pattern(values.dtype)
        return SampledWeightFunction.apply(x, values, bias, product, layer.op, pattern)

    values = layer.drt_values.detach().clone().requires_grad_(True)
    bias = module.bias.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (x, values, bias))
    assert layer.op.last_grad_kernel == _expected_kernel(gradient_kernel, kind)


def test_sddmm_matches_dense_product_in_float32_and_bfloat16() -> None:
    a, b = torch.randn(8, 20), torch.randn(20, 6)
    indices = _random_indices(48, 10, seed=3)
    dense = (a @ b).reshape(-1)[indices]
    assert torch.allclose(sddmm(csr_pattern(indices, (8, 6), torch.float32), a, b), dense, atol=1e-5)
    low = sddmm(csr_pattern(indices, (8, 6), torch.float32), a.bfloat16(), b.bfloat16())
    assert low.dtype == torch.bfloat16
    assert torch.allclose(low.float(), dense, atol=0.1, rtol=0.05)


def test_the_dense_sddmm_gathers_the_dense_product() -> None:
    """The CUDA kernel choice ``"dense"`` (run here on CPU tensors): Linear's and Conv1D's factors as strided views."""
    g = torch.Generator().manual_seed(4)
    data = torch.randn(20, 14, generator=g, dtype=torch.float64)
    for a, b in ((data[:, :8].t(), data[:, 8:]), (data[:, 8:].t(), data[:, :8])):
        indices = _random_indices(a.shape[0] * b.shape[1], 10, seed=3)
        pattern = csr_pattern(indices, (a.shape[0], b.shape[1]), torch.float64)
        assert torch.equal(dense_sddmm(pattern, a, b), (a @ b).reshape(-1)[indices])
        assert torch.allclose(dense_sddmm(pattern, a, b), sddmm(pattern, a, b))
    empty = csr_pattern(torch.empty(0, dtype=torch.int64), (8, 6), torch.float64)
    assert dense_sddmm(empty, data[:, :8].t(), data[:, 8:]).shape == (0,)


def test_a_csr_layer_runs_dense_products_on_a_device_without_the_csr_kernels(monkeypatch) -> None:
    """The CSR kernels follow the weight's device (CSR_DEVICE_TYPES: CPU); elsewhere the layer runs dense products,
    its dense buffer allocated when first needed and dropped when the layer is back where the CSR kernels run."""
    module, x_shape, d = _modules()["linear-sparse"]
    indices = _random_indices(module.weight.numel(), d)
    layer = DRTLayer(module, indices, "prune", train_bias=True)
    with torch.no_grad():
        layer.drt_values.add_(1.0)
    assert layer.sparse_kernels and layer.drt_effective.numel() == 0  # no D-sized buffer beside the CSR matrices
    x = torch.randn(x_shape, generator=torch.Generator().manual_seed(1))
    grad_out = torch.randn(*x_shape[:-1], 30, generator=torch.Generator().manual_seed(2))
    layer(x).backward(grad_out)
    expected = layer.drt_values.grad.clone(), module.bias.grad.clone()
    layer.drt_values.grad = module.bias.grad = None

    monkeypatch.setattr(layer_module, "CSR_DEVICE_TYPES", ())  # as on a CUDA device
    assert not layer.sparse_kernels and "sparse_kernels" not in repr(layer)
    dense_out = layer(x)
    assert layer.drt_effective.shape == module.weight.shape
    assert torch.equal(layer.effective_weight(), layer.drt_effective)
    dense_out.backward(grad_out)
    assert torch.allclose(layer.drt_values.grad, expected[0], atol=1e-6)
    assert torch.allclose(module.bias.grad, expected[1], atol=1e-6)
    moved = _random_indices(module.weight.numel(), d, seed=5)
    layer.update_indices(moved)  # the dropped entries leave the dense buffer; the grown ones start at 0
    with torch.no_grad():
        layer.drt_values.add_(1.0)
    assert torch.equal(layer.effective_weight().reshape(-1).nonzero().flatten(), moved)

    monkeypatch.setattr(layer_module, "CSR_DEVICE_TYPES", ("cpu",))
    layer.float()  # any move (to, cuda, cpu, float) re-decides
    assert layer.sparse_kernels and layer.drt_effective.numel() == 0
    assert torch.equal(layer.effective_weight().reshape(-1).nonzero().flatten(), moved)


def test_values_written_after_fused_optimizer_step() -> None:
    """Fused optimizers do not bump version counters; the next forward must still see new ϑ."""
    torch.manual_seed(0)
    layer = DRTLayer(nn.Linear(4, 3), _random_indices(12, 4), "freeze")
    optimizer = torch.optim.AdamW([layer.drt_values], lr=0.5, fused=True)
    x = torch.randn(2, 4)
    layer(x).sum().backward()
    optimizer.step()
    out = layer(x)
    expected = layer.base_layer.weight.detach().clone().reshape(-1)
    expected[layer.drt_indices] = layer.drt_values.detach()
    assert torch.allclose(out, x @ expected.reshape(3, 4).t() + layer.base_layer.bias)


def test_merge_and_unload_of_one_layer() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(4, 3)
    original = linear.weight.detach().clone()
    indices = _random_indices(12, 4)
    for mode in ("freeze", "prune"):
        layer = DRTLayer(linear, indices, mode)
        with torch.no_grad():
            layer.drt_values.fill_(7.0)
        merged = layer.merge().weight.detach().reshape(-1)
        assert (merged[indices] == 7.0).all()
        others = torch.ones(12, dtype=torch.bool)
        others[indices] = False
        expected_rest = original.reshape(-1)[others] if mode == "freeze" else torch.zeros(8)
        assert torch.equal(merged[others], expected_rest)
        with torch.no_grad():
            linear.weight.copy_(original)


def test_rejects_bad_indices() -> None:
    with pytest.raises(ValueError, match="sorted and unique"):
        DRTLayer(nn.Linear(4, 3), torch.tensor([3, 1]), "freeze")
    with pytest.raises(ValueError, match="out of range"):
        DRTLayer(nn.Linear(4, 3), torch.tensor([1, 12]), "freeze")
    with pytest.raises(TypeError, match="supported module types"):
        DRTLayer(nn.Embedding(4, 3), torch.tensor([1]), "freeze")


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
def test_decayed_frozen_entries_in_forward_and_backward(kind: str) -> None:
    module, x_shape, d = _modules()[kind]
    module = module.double()
    original = module.weight.detach().clone()
    indices = _random_indices(original.numel(), d)
    layer = FrozenDecayLayer(module, indices, train_bias=True)
    layer.decay_frozen(0.5)
    layer.decay_frozen(0.8)
    with torch.no_grad():
        layer.drt_values.add_(1.0)
    expected = (original * 0.4).reshape(-1)
    expected[indices] = layer.drt_values.detach()
    dense_w = expected.reshape(original.shape).clone().requires_grad_(True)
    x = torch.randn(x_shape, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, ref = layer(x), layer.op.forward(x_ref, dense_w, module.bias)
    assert torch.allclose(out, ref) and torch.allclose(layer.effective_weight(), dense_w)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref.backward(grad_out)
    assert torch.allclose(layer.drt_values.grad, dense_w.grad.reshape(-1)[indices])
    assert torch.allclose(x.grad, x_ref.grad)
    assert torch.equal(layer.unload().weight, original)


class _ScaledLinear(nn.Linear):
    """A Linear subclass that behaves like its base: embeddable once registered."""


def test_a_new_module_type_is_one_registration(monkeypatch) -> None:
    from drt_peft.layer import SUPPORTED_TYPES, register_weight_op
    from drt_peft.layer.ops import LinearOp

    net = nn.Sequential(_ScaledLinear(4, 3))
    with pytest.raises(TypeError, match=r"cannot embed a _ScaledLinear; .*register_weight_op adds one"):
        weight_op(net[0])
    monkeypatch.setitem(SUPPORTED_TYPES, _ScaledLinear, LinearOp)  # what register_weight_op does, undone after
    register_weight_op(_ScaledLinear, LinearOp)
    model = get_drt_model(net, RandomConfig(density=0.5, target_modules=["0"]))
    assert [name for name, _ in model.drt_layers()] == ["0"]
    with pytest.raises(TypeError, match="must be a WeightOp subclass"):
        register_weight_op(_ScaledLinear, object)
