"""Data-driven and data-free criteria against hand computations with plain autograd on a tiny net."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from drt_peft import (
    FISHConfig,
    FORCEConfig,
    GraSPAbsConfig,
    GraSPConfig,
    LubanaDickConfig,
    SNIPConfig,
    SynFlowConfig,
    get_drt_model,
)
from drt_peft.config import DRTConfig
from drt_peft.layer import weight_op
from drt_peft.masks import ScoringContext, select_masks
from drt_peft.masks.scoring import score
from drt_peft.targeting import Target


def _mlp(bias: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6, bias=bias), nn.Tanh(), nn.Linear(6, 3, bias=bias)).double()


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g)) for _ in range(2)
    ]


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _scores(config: DRTConfig, model: nn.Module, data=None, loss_fn=_loss) -> list[torch.Tensor]:
    targets = [Target(n, m, weight_op(m)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    select = functools.partial(select_masks, targets, config)
    return score(config.criterion, ScoringContext(model, targets, config, data, loss_fn, select))


def _flat_loss(model: nn.Module, batches: list, flat: torch.Tensor) -> torch.Tensor:
    """Mean batch loss as a function of the concatenated Linear weights (biases fixed)."""
    w0 = model[0].weight.numel()
    w1 = flat[w0:].reshape(model[2].weight.shape)
    losses = []
    for x, y in batches:
        h = torch.tanh(x @ flat[:w0].reshape(model[0].weight.shape).t() + model[0].bias)
        losses.append(nn.functional.cross_entropy(h @ w1.t() + model[2].bias, y))
    return torch.stack(losses).mean()


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([model[0].weight.detach().flatten(), model[2].weight.detach().flatten()])


def _unflat(model: nn.Module, flat: torch.Tensor) -> list[torch.Tensor]:
    w0 = model[0].weight.numel()
    return [flat[:w0].reshape(model[0].weight.shape), flat[w0:].reshape(model[2].weight.shape)]


def _gradient(model: nn.Module, batches: list) -> torch.Tensor:
    return torch.autograd.functional.jacobian(functools.partial(_flat_loss, model, batches), _flat(model))


def test_snip_and_lubana_dick_match_plain_autograd() -> None:
    model, data = _mlp(), _batches()
    theta, g = _flat(model), _gradient(model, data)
    for config, expected in (
        (SNIPConfig(density=0.5), (g * theta).abs()),
        (LubanaDickConfig(density=0.5), g.abs() * theta**2),
    ):
        got = _scores(config, model, data)
        for s, e in zip(got, _unflat(model, expected), strict=True):
            assert torch.allclose(s.double(), e, rtol=1e-5, atol=1e-7), config.method_name


def test_grasp_matches_an_explicit_hessian() -> None:
    model, data = _mlp(), _batches()
    theta, g = _flat(model), _gradient(model, data)
    hessian = torch.autograd.functional.hessian(functools.partial(_flat_loss, model, data), theta)
    hg = hessian @ g
    for config, expected in ((GraSPConfig(density=0.5), theta * hg), (GraSPAbsConfig(density=0.5), (theta * hg).abs())):
        got = _scores(config, model, data)
        for s, e in zip(got, _unflat(model, expected), strict=True):
            assert torch.allclose(s.double(), e, rtol=1e-4, atol=1e-8), config.method_name
    # GraSP keeps the lowest −θ ⊙ Hg: the selected entries are the largest θ ⊙ Hg
    model_copy = _mlp()
    drt = get_drt_model(
        model_copy,
        GraSPConfig(num_trainable=10, budget="global", target_modules=["0", "2"]),
        calibration_data=data,
        loss_fn=_loss,
    )
    chosen = torch.cat([m.flatten() for m in drt.get_masks().values()])
    assert set(chosen.nonzero().flatten().tolist()) == set((-(theta * hg)).argsort()[:10].tolist())


@pytest.mark.parametrize("labels", ["true", "predicted"])
def test_fisher_matches_explicit_per_sample_gradients(labels: str) -> None:
    model, data = _mlp(), _batches()
    squares = torch.zeros_like(_flat(model))
    count = 0
    for x, y in data:
        for i in range(len(y)):
            target = model(x[i : i + 1]).argmax(-1) if labels == "predicted" else y[i : i + 1]
            grad = torch.autograd.functional.jacobian(
                functools.partial(_flat_loss, model, [(x[i : i + 1], target)]), _flat(model)
            )
            squares += grad**2
            count += 1
    config = FISHConfig(density=0.5, num_samples=count, fisher_labels=labels)
    if labels == "predicted":
        with pytest.raises(ValueError, match="fisher_labels='predicted' needs dict batches"):
            _scores(config, model, data)
        return
    for s, e in zip(_scores(config, model, data), _unflat(model, squares / count), strict=True):
        assert torch.allclose(s.double(), e, rtol=1e-5, atol=1e-9)
    # num_samples stops early: the first 3 samples only
    first = FISHConfig(density=0.5, num_samples=3)
    assert not torch.allclose(_scores(first, model, data)[0], _scores(config, model, data)[0])


def test_force_with_one_round_is_snip_and_iterates_on_the_masked_network() -> None:
    model, data = _mlp(), _batches()
    snip = _scores(SNIPConfig(density=0.3), model, data)
    one = _scores(FORCEConfig(density=0.3, rounds=1), model, data)
    assert all(torch.allclose(a, b) for a, b in zip(snip, one, strict=True))
    # by hand: round 1 at 0.3^(1/2) on the dense net, round 2 rescored on the masked net
    config = FORCEConfig(density=0.3, rounds=2, budget="global")
    targets = [Target(n, m, weight_op(m)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    first = select_masks(targets, config, _scores(SNIPConfig(density=0.3, budget="global"), model, data), 0.3**0.5)
    masked = _mlp()
    with torch.no_grad():
        masked[0].weight.mul_(first[0])
        masked[2].weight.mul_(first[1])
    g = _gradient(masked, data)
    expected = (g * _flat(model)).abs()
    got = _scores(config, model, data)
    for s, e in zip(got, _unflat(model, expected), strict=True):
        assert torch.allclose(s.double(), e, rtol=1e-5, atol=1e-9)
    assert torch.equal(model[0].weight, _mlp()[0].weight), "FORCE must restore the weights"


def test_synflow_conserves_flow_layer_by_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 8, bias=False), nn.ReLU(), nn.Linear(8, 5, bias=False), nn.ReLU(), nn.Linear(5, 3, bias=False)
    )
    before = [m.weight.detach().clone() for m in model if isinstance(m, nn.Linear)]
    scores = _scores(SynFlowConfig(density=0.5, rounds=1), model, [(torch.randn(1, 6), None)], loss_fn=None)
    totals = torch.stack([s.sum() for s in scores])
    assert torch.allclose(totals, totals[0].expand(3), rtol=1e-9)
    # per neuron: flow into neuron j of a hidden layer equals flow out of it
    assert torch.allclose(scores[0].sum(1), scores[1].sum(0), rtol=1e-9)
    assert torch.allclose(scores[1].sum(1), scores[2].sum(0), rtol=1e-9)
    # R = 1ᵀ f_|θ|(1) equals each layer's total
    r = (
        torch.ones(1, 6, dtype=torch.float64)
        @ before[0].double().abs().t()
        @ before[1].double().abs().t()
        @ before[2].double().abs().t()
    ).sum()
    assert torch.allclose(totals[0], r)
    for m, w in zip([m for m in model if isinstance(m, nn.Linear)], before, strict=True):
        assert torch.equal(m.weight, w) and m.weight.dtype == torch.float32


def test_synflow_iterates_and_is_deterministic() -> None:
    model = _mlp(bias=False).float()
    config = SynFlowConfig(density=0.2, rounds=5, budget="global", target_modules=["0", "2"])
    a = get_drt_model(_mlp(bias=False).float(), config, calibration_data=[(torch.ones(1, 4), None)]).get_masks()
    b = get_drt_model(model, config, calibration_data=[(torch.ones(1, 4), None)]).get_masks()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sum(int(m.sum()) for m in a.values()) == round(0.2 * 42)


def test_data_driven_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"pass calibration_data=\.\.\. to get_drt_model"):
        get_drt_model(_mlp(), SNIPConfig(density=0.5, target_modules=["0"]))
    with pytest.raises(ValueError, match="calibration_data for method 'snip' is empty"):
        get_drt_model(_mlp(), SNIPConfig(density=0.5, target_modules=["0"]), calibration_data=[], loss_fn=_loss)
    with pytest.raises(ValueError, match=r"not dicts of model inputs.*loss_fn="):
        get_drt_model(_mlp(), SNIPConfig(density=0.5, target_modules=["0"]), calibration_data=_batches())
    with pytest.raises(ValueError, match="num_batches=0 must be a positive integer"):
        SNIPConfig(density=0.5, num_batches=0)
    with pytest.raises(ValueError, match="schedule='cosine' is not supported"):
        FORCEConfig(density=0.5, schedule="cosine")
    with pytest.raises(ValueError, match="fisher_labels='gold' is not supported"):
        FISHConfig(density=0.5, fisher_labels="gold")
