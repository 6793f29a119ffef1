"""Data-driven and data-free criteria against hand computations with plain autograd on a tiny net."""

from __future__ import annotations

import dataclasses
import functools
from types import SimpleNamespace

import pytest
import torch
from conftest import random_bert_batch, random_lm_batch, tiny_bert, tiny_gpt2
from torch import nn

from drt_peft import (
    FISHConfig,
    FORCEConfig,
    FreezeNetConfig,
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
from drt_peft.targeting import Target, find_targets


def _mlp(bias: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6, bias=bias), nn.Tanh(), nn.Linear(6, 3, bias=bias)).double()


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g)) for _ in range(2)
    ]


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x) / temperature, y)


def _scores(config: DRTConfig, model: nn.Module, data=None, loss_fn=_loss) -> list[torch.Tensor]:
    targets = [Target(n, m, weight_op(m)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    select = functools.partial(select_masks, targets, config)
    return score(config.criterion, ScoringContext(model, targets, config, data, loss_fn, select))


def _flat_loss(model: nn.Module, batches: list, flat: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean batch loss, of the logits divided by ``temperature``, as a function of the concatenated Linear weights
    (biases fixed)."""
    w0 = model[0].weight.numel()
    w1 = flat[w0:].reshape(model[2].weight.shape)
    losses = []
    for x, y in batches:
        h = torch.tanh(x @ flat[:w0].reshape(model[0].weight.shape).t() + model[0].bias)
        losses.append(nn.functional.cross_entropy((h @ w1.t() + model[2].bias) / temperature, y))
    return torch.stack(losses).mean()


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([model[0].weight.detach().flatten(), model[2].weight.detach().flatten()])


def _unflat(model: nn.Module, flat: torch.Tensor) -> list[torch.Tensor]:
    w0 = model[0].weight.numel()
    return [flat[:w0].reshape(model[0].weight.shape), flat[w0:].reshape(model[2].weight.shape)]


def _gradient(model: nn.Module, batches: list, temperature: float = 1.0) -> torch.Tensor:
    loss = functools.partial(_flat_loss, model, batches, temperature=temperature)
    return torch.autograd.functional.jacobian(loss, _flat(model))


def _hessian_gradient(model: nn.Module, batches: list, temperature: float) -> torch.Tensor:
    """H g of the mean loss of logits / ``temperature``, from the explicit Hessian."""
    loss = functools.partial(_flat_loss, model, batches, temperature=temperature)
    return torch.autograd.functional.hessian(loss, _flat(model)) @ _gradient(model, batches, temperature)


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


@pytest.mark.parametrize("temperature", [1.0, 200.0])
def test_grasp_matches_an_explicit_hessian(temperature: float) -> None:
    """g and H g of the loss of logits / T, T = 200 as Wang et al.'s code, against the explicit Hessian."""
    model, data = _mlp(), _batches()
    theta, hg = _flat(model), _hessian_gradient(model, data, temperature)
    for config, expected in (
        (GraSPConfig(density=0.5, temperature=temperature), theta * hg),
        (GraSPAbsConfig(density=0.5, temperature=temperature), (theta * hg).abs()),
    ):
        got = _scores(config, model, data)
        for s, e in zip(got, _unflat(model, expected), strict=True):
            assert torch.allclose(s.double(), e, rtol=1e-4, atol=1e-6 * float(expected.abs().max())), config
    # GraSP keeps the lowest −θ ⊙ Hg: the selected entries are the largest θ ⊙ Hg
    model_copy = _mlp()
    drt = get_drt_model(
        model_copy,
        GraSPConfig(num_trainable=10, budget="global", target_modules=["0", "2"], temperature=temperature),
        calibration_data=data,
        loss_fn=_loss,
    )
    chosen = torch.cat([m.flatten() for m in drt.get_masks().values()])
    assert set(chosen.nonzero().flatten().tolist()) == set((-(theta * hg)).argsort()[:10].tolist())


def test_grasp_temperature_changes_the_scores_not_just_their_scale() -> None:
    model, data = _mlp(), _batches()
    plain, tempered = _hessian_gradient(model, data, 1.0), _hessian_gradient(model, data, 200.0)
    assert plain @ tempered < 0.9 * plain.norm() * tempered.norm(), "T = 200 changes the direction of H g"
    assert GraSPConfig(density=0.5).temperature == 200.0 == GraSPAbsConfig(density=0.5).temperature


def _causal_lm_loss(model: nn.Module, batch: dict, temperature: float) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"]).logits / temperature
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())


def _classifier_loss(model: nn.Module, batch: dict, temperature: float) -> torch.Tensor:
    return nn.functional.cross_entropy(model(input_ids=batch["input_ids"]).logits / temperature, batch["labels"])


def _transformer_scores(config: DRTConfig, model: nn.Module, data: list, loss_fn) -> list[torch.Tensor]:
    names = find_targets(model, config.target_modules)
    targets = [Target(n, model.get_submodule(n), weight_op(model.get_submodule(n))) for n in names]
    select = functools.partial(select_masks, targets, config)
    return score(config.criterion, ScoringContext(model, targets, config, data, loss_fn, select))


@pytest.mark.parametrize("kind", ["classification", "causal_lm"])
def test_grasp_recomputes_a_transformers_loss_from_tempered_logits(kind: str) -> None:
    """Without loss_fn the model's loss is recomputed from logits / T: the same scores as a loss_fn dividing by T."""
    g = torch.Generator().manual_seed(4)
    build, batches, loss_fn = (
        (tiny_bert, [random_bert_batch(g) for _ in range(2)], _classifier_loss)
        if kind == "classification"
        else (tiny_gpt2, [random_lm_batch(g) for _ in range(2)], _causal_lm_loss)
    )
    config = GraSPConfig(density=0.1, target_modules=r".*(query|c_attn)")
    ours = _transformer_scores(config, build(), batches, None)
    assert all(
        torch.allclose(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max()))
        for a, b in zip(ours, _transformer_scores(config, build(), batches, loss_fn), strict=True)
    )
    plain = _transformer_scores(dataclasses.replace(config, temperature=1.0), build(), batches, None)
    largest = [max(float(s.abs().max()) for s in scores) for scores in (ours, plain)]
    assert 0 < largest[0] < 1e-3 * largest[1], "T = 200 reaches the loss: g and H g shrink with 1/T"


def test_grasp_temperature_is_validated_and_reaches_loss_fn_or_fails_clearly() -> None:
    for bad in (0, -1.0, float("inf"), "200", True):
        with pytest.raises(ValueError, match=rf"temperature={bad!r} must be a finite number > 0"):
            GraSPConfig(density=0.5, temperature=bad)
    model, data = _mlp(), _batches()

    def untempered(model: nn.Module, batch: tuple) -> torch.Tensor:
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    with pytest.raises(ValueError, match=r"temperature=200\.0.*give it a `temperature` parameter"):
        _scores(GraSPConfig(density=0.5), model, data, loss_fn=untempered)
    _scores(GraSPConfig(density=0.5, temperature=1.0), model, data, loss_fn=untempered)  # T = 1: as before
    seen = []

    def keywords(model: nn.Module, batch: tuple, **options: float) -> torch.Tensor:
        seen.append(options)
        return _loss(model, batch, **options)

    _scores(GraSPConfig(density=0.5, temperature=7.0), model, data, loss_fn=keywords)
    assert seen and all(options == {"temperature": 7.0} for options in seen)
    # a transformers loss that is not the cross-entropy of its logits (regression) is refused, not guessed
    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"is not the cross-entropy of its `logits` and `labels`.*temperature=1\.0"):
        get_drt_model(tiny_bert(num_labels=1), GraSPConfig(density=0.1), [{"input_ids": ids, "labels": torch.randn(4)}])
    # multi-label classification: binary cross-entropy of the tempered logits
    multi = tiny_bert(num_labels=3, problem_type="multi_label_classification")
    get_drt_model(multi, GraSPConfig(density=0.1), [{"input_ids": ids, "labels": (torch.rand(4, 3) > 0.5).float()}])


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


class _DictMLP(nn.Module):
    """:func:`_mlp` taking dict batches ``model(x=..., labels=...)``, as a transformers classifier does."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp()

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> SimpleNamespace:
        logits = self.net(x)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SimpleNamespace(logits=logits, loss=loss)


@pytest.mark.parametrize("labels", ["predicted", "sampled", "expected"])
def test_fisher_with_the_models_own_labels_matches_explicit_per_sample_gradients(labels: str) -> None:
    """y from p(y|x): its arg-max, a draw seeded per sample (seed, "fisher labels", sample index), or every y weighted
    by p(y|x), the sum of Sung et al.'s code's ``calculate_the_importance_expect``."""
    from drt_peft.seeding import generator

    model, data = _DictMLP(), _batches()
    squares, count = torch.zeros_like(_flat(model.net)), 0
    for x, _ in data:
        for i in range(len(x)):
            sample = x[i : i + 1]
            probs = torch.softmax(model.net(sample).detach().float(), -1)[0]
            if labels == "predicted":
                terms = [(1.0, probs.argmax())]
            elif labels == "sampled":
                draw = generator(3, "fisher labels", str(count))
                terms = [(1.0, torch.multinomial(probs.double(), 1, generator=draw))]
            else:
                terms = [(float(p), torch.tensor(y)) for y, p in enumerate(probs)]
            for weight, y in terms:
                loss = functools.partial(_flat_loss, model.net, [(sample, y.reshape(1))])
                squares += weight * torch.autograd.functional.jacobian(loss, _flat(model.net)) ** 2
            count += 1
    config = FISHConfig(density=0.5, num_samples=count, fisher_labels=labels, seed=3)
    batches = [{"x": x, "labels": y} for x, y in data]
    for s, e in zip(_scores(config, model, batches, loss_fn=None), _unflat(model.net, squares / count), strict=True):
        assert torch.allclose(s.double(), e, rtol=1e-5, atol=1e-9)
    if labels == "sampled":  # another seed, other draws
        other = _scores(dataclasses.replace(config, seed=4), model, batches, loss_fn=None)
        assert not torch.allclose(other[0], _scores(config, model, batches, loss_fn=None)[0])


def test_fisher_expected_needs_one_prediction_per_sample() -> None:
    batches = [random_lm_batch(torch.Generator().manual_seed(0), size=2)]
    config = FISHConfig(density=0.1, num_samples=2, fisher_labels="expected")
    with pytest.raises(ValueError, match=r"fisher_labels='expected' needs one prediction per sample.*'sampled'"):
        get_drt_model(tiny_gpt2(), config, calibration_data=batches)
    get_drt_model(tiny_gpt2(), dataclasses.replace(config, fisher_labels="sampled"), calibration_data=batches)


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


# -- the papers' settings: one global threshold, pruned -------------------------------------------------------------
PAPER_SETTINGS = {
    SNIPConfig: {"budget": "global", "mode": "prune", "num_batches": 1},
    GraSPConfig: {"budget": "global", "mode": "prune", "temperature": 200.0},
    GraSPAbsConfig: {"budget": "global", "mode": "prune", "temperature": 200.0},
    SynFlowConfig: {"budget": "global", "mode": "prune", "rounds": 100, "schedule": "exponential"},
    FORCEConfig: {"budget": "global", "mode": "prune"},
    FreezeNetConfig: {"budget": "global", "mode": "freeze"},
}


def _global_top_k(scores: list[torch.Tensor], k: int) -> torch.Tensor:
    """The entries of one threshold over all layers, by sorting: the k largest scores, ties to the lower position."""
    flat = torch.cat([s.flatten().double() for s in scores])
    return torch.zeros_like(flat, dtype=torch.bool).index_fill_(0, flat.argsort(descending=True, stable=True)[:k], True)


def test_snip_as_in_paper_is_a_global_pruned_mask_from_one_batch() -> None:
    """By hand: |g ⊙ θ| with g of the first batch only, one threshold over both layers, the rest zero."""
    model, data = _mlp(), _batches()
    theta = _flat(model)
    expected = _global_top_k([(_gradient(model, data[:1]) * theta).abs()], 10)
    config = SNIPConfig.as_in_paper(num_trainable=10, target_modules=["0", "2"])
    assert config == SNIPConfig(
        num_trainable=10, target_modules=["0", "2"], budget="global", mode="prune", num_batches=1
    )
    drt = get_drt_model(_mlp(), config, calibration_data=data, loss_fn=_loss)
    assert torch.equal(torch.cat([m.flatten() for m in drt.get_masks().values()]), expected)
    merged = drt.merge_and_unload()
    assert torch.equal(torch.cat([merged[0].weight.flatten(), merged[2].weight.flatten()]), theta * expected)


@pytest.mark.parametrize("cls", list(PAPER_SETTINGS), ids=lambda cls: cls.__name__)
def test_as_in_paper_equals_the_explicit_config_and_thresholds_globally(cls: type[DRTConfig]) -> None:
    fields = {"num_trainable": 12, "target_modules": ["0", "2"]}
    paper = cls.as_in_paper(**fields)
    explicit = cls(**fields, **PAPER_SETTINGS[cls])
    assert paper == explicit and type(paper) is cls
    assert cls.as_in_paper(**fields, budget="uniform") == dataclasses.replace(explicit, budget="uniform")  # fields win
    data = [(torch.ones(1, 4, dtype=torch.float64), None)] if cls is SynFlowConfig else _batches()
    loss_fn = None if cls is SynFlowConfig else _loss
    expected = _global_top_k(_scores(explicit, _mlp(), data, loss_fn), 12)
    drt = get_drt_model(_mlp(), paper, calibration_data=data, loss_fn=loss_fn)
    assert torch.equal(torch.cat([m.flatten() for m in drt.get_masks().values()]), expected)
    assert all(layer.mode == PAPER_SETTINGS[cls]["mode"] for _, layer in drt.drt_layers())


def test_as_in_paper_needs_a_recorded_setting_of_the_class_itself() -> None:
    with pytest.raises(NotImplementedError, match=r"LubanaDickConfig records no paper setting.*'SNIPConfig'"):
        LubanaDickConfig.as_in_paper(density=0.1)
    # defaults are the fine-tuning setting: frozen, uniform
    assert (SNIPConfig(density=0.1).mode, SNIPConfig(density=0.1).budget) == ("freeze", "uniform")
