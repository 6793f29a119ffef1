"""Lottery-ticket search: round count (eq. 18), reset and rewind values, nested masks, resumption, LAMP."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math

import pytest
import torch
from conftest import (
    assert_loads_identically,
    cpu_training_args,
    random_bert_batch,
    random_vit_batch,
    tiny_bert,
    tiny_mlp,
    tiny_vit,
    train_steps,
)
from torch import nn
from transformers import Trainer

from drt_peft import DRTModel, LotteryTicketConfig, PruneOrFreezeConfig, find_lottery_ticket, get_drt_model
from drt_peft.masks.criteria.basic import lamp

TARGETS = ["0", "2"]


class Recorder:
    """A deterministic train_fn: SGD on fixed data, recording what each round started from."""

    def __init__(self, steps: int = 5, fail_at_round: int | None = None) -> None:
        self.steps, self.fail_at_round = steps, fail_at_round
        self.starts: list[dict[str, torch.Tensor]] = []
        self.indices: list[dict[str, torch.Tensor]] = []
        self.after_step: dict[int, dict[str, torch.Tensor]] = {}
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)

    def __call__(self, model: DRTModel) -> dict[str, float]:
        if self.fail_at_round == len(self.starts):
            raise KeyboardInterrupt("interrupted")
        layers = dict(model.drt_layers())
        self.starts.append({n: layer.drt_values.detach().clone() for n, layer in layers.items()})
        self.indices.append({n: layer.drt_indices.clone() for n, layer in layers.items()})
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        for step in range(1, self.steps + 1):
            loss = nn.functional.cross_entropy(model(self.x), self.y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            model.update_masks(step, optimizer)
            if len(self.starts) == 1:
                self.after_step[step] = {n: layer.drt_values.detach().clone() for n, layer in layers.items()}
        return {"loss": loss.item()}


def test_round_count_follows_eq_18() -> None:
    config = LotteryTicketConfig(density=0.1, target_modules=TARGETS)
    assert config.num_rounds == math.ceil(math.log(0.1) / math.log(0.8)) == 11
    densities = config.round_densities()
    assert len(densities) == 12 and densities[0] == 1.0 and densities[-1] == 0.1
    assert all(b < a for a, b in itertools.pairwise(densities))
    assert LotteryTicketConfig(density=0.1, one_shot=True, target_modules=TARGETS).round_densities() == [1.0, 0.1]
    assert LotteryTicketConfig(density=0.5, prune_fraction=0.5, target_modules=TARGETS).num_rounds == 1


def test_rounds_reset_survivors_to_init_and_nest(tmp_path) -> None:
    model = tiny_mlp()
    init = {n: model.get_submodule(n).weight.detach().clone().reshape(-1) for n in TARGETS}
    config = LotteryTicketConfig(density=0.3, prune_fraction=0.5, target_modules=TARGETS)
    train = Recorder()
    ticket = find_lottery_ticket(model, config, train, output_dir=tmp_path, verbose=False)
    densities = config.round_densities()
    assert len(train.starts) == len(densities) == 3
    total = sum(init[n].numel() for n in TARGETS)
    for r, density in enumerate(densities):
        assert sum(i.numel() for i in train.indices[r].values()) == round(density * total)
        for name in TARGETS:  # every round starts from Θ(0) at its ψ
            torch.testing.assert_close(train.starts[r][name], init[name][train.indices[r][name]], rtol=0, atol=0)
            if r:
                assert bool(torch.isin(train.indices[r][name], train.indices[r - 1][name]).all())
    state = json.loads((tmp_path / "lottery_state.json").read_text())
    assert [round_["density"] for round_ in state["rounds"]] == densities
    assert all("loss" in round_["metrics"] for round_ in state["rounds"])
    assert ticket.drt_config.density == 0.3


def test_next_mask_keeps_largest_trained_magnitudes_globally(tmp_path) -> None:
    config = LotteryTicketConfig(density=0.5, one_shot=True, target_modules=TARGETS)
    train = Recorder()
    find_lottery_ticket(tiny_mlp(), config, train, output_dir=tmp_path, verbose=False)
    trained = torch.cat([train.after_step[train.steps][n].abs() for n in TARGETS])
    k = round(0.5 * trained.numel())
    expected = torch.zeros_like(trained, dtype=torch.bool)
    expected[torch.topk(trained, k).indices] = True
    offsets = [0, train.indices[0]["0"].numel()]
    chosen = torch.zeros_like(expected)
    for name, offset in zip(TARGETS, offsets, strict=True):
        chosen[offset + train.indices[1][name]] = True
    assert torch.equal(chosen, expected)


def test_late_rewinding_restarts_from_step_k(tmp_path) -> None:
    config = LotteryTicketConfig(density=0.5, one_shot=True, rewind_step=2, target_modules=TARGETS)
    train = Recorder()
    find_lottery_ticket(tiny_mlp(), config, train, output_dir=tmp_path, verbose=False)
    for name in TARGETS:
        rewound = train.after_step[2][name][train.indices[1][name]]
        torch.testing.assert_close(train.starts[1][name], rewound, rtol=0, atol=0)
        assert not torch.equal(rewound, train.after_step[train.steps][name][train.indices[1][name]])


def test_late_rewinding_restores_trained_biases_too(tmp_path) -> None:
    config = LotteryTicketConfig(density=0.5, one_shot=True, rewind_step=2, target_modules=TARGETS, bias="all")
    biases: list[torch.Tensor] = []

    def train(model: DRTModel) -> dict[str, float]:
        biases.append(model.get_base_model()[0].bias.detach().clone())
        return Recorder()(model)

    find_lottery_ticket(tiny_mlp(), config, train, output_dir=tmp_path, verbose=False)
    dense = get_drt_model(tiny_mlp(), dataclasses.replace(config, density=1.0))
    Recorder(steps=2)(dense)  # the dense round up to step k, as the search ran it
    assert torch.equal(biases[1], dense.get_base_model()[0].bias) and not torch.equal(biases[1], biases[0])


def test_the_rewind_snapshot_is_policy_state_that_moves_and_resumes() -> None:
    config = LotteryTicketConfig(density=1.0, rewind_step=2, target_modules=TARGETS)
    model = get_drt_model(tiny_mlp(), config)
    assert model.drt_policy.rewind_snapshot(model) is None
    Recorder(steps=3)(model)
    snapshot = model.drt_policy.rewind_snapshot(model)
    assert sorted(snapshot) == ["drt.0", "drt.2"]
    state = model.training_state_dict()
    assert {"drt_policy.rewind_0", "drt_policy.rewind_1"} <= state.keys()
    resumed = get_drt_model(tiny_mlp(), config)
    resumed.load_state_dict(state, strict=False)  # as a Trainer resume does: the buffers come back
    again = resumed.drt_policy.rewind_snapshot(resumed)
    assert again is not None and all(torch.equal(again[k], snapshot[k]) for k in snapshot)
    resumed.double()
    assert all(v.dtype == torch.float64 for v in resumed.drt_policy.rewind_snapshot(resumed).values())


def test_rewind_without_the_step_hook_is_an_error(tmp_path) -> None:
    config = LotteryTicketConfig(density=0.5, one_shot=True, rewind_step=50, target_modules=TARGETS)
    with pytest.raises(RuntimeError, match="never reached optimizer step 50"):
        find_lottery_ticket(tiny_mlp(), config, Recorder(steps=3), output_dir=tmp_path, verbose=False)


def test_interrupted_search_resumes_after_its_last_round(tmp_path) -> None:
    config = LotteryTicketConfig(density=0.2, prune_fraction=0.5, rewind_step=1, target_modules=TARGETS)
    reference = find_lottery_ticket(tiny_mlp(), config, Recorder(), output_dir=tmp_path / "a", verbose=False)
    with pytest.raises(KeyboardInterrupt):
        find_lottery_ticket(tiny_mlp(), config, Recorder(fail_at_round=2), output_dir=tmp_path / "b", verbose=False)
    assert len(json.loads((tmp_path / "b" / "lottery_state.json").read_text())["rounds"]) == 2
    resumed_train = Recorder()
    resumed = find_lottery_ticket(tiny_mlp(), config, resumed_train, output_dir=tmp_path / "b", verbose=False)
    assert len(resumed_train.starts) == len(config.round_densities()) - 2
    for (_, a), (_, b) in zip(reference.drt_layers(), resumed.drt_layers(), strict=True):
        assert torch.equal(a.drt_indices, b.drt_indices)
        torch.testing.assert_close(a.drt_values, b.drt_values, rtol=0, atol=0)
    other = LotteryTicketConfig(density=0.2, prune_fraction=0.4, target_modules=TARGETS)
    with pytest.raises(ValueError, match=r"different config \(fields \['prune_fraction', 'rewind_step'\]"):
        find_lottery_ticket(tiny_mlp(), other, Recorder(), output_dir=tmp_path / "b", verbose=False)


def test_the_search_logs_its_plan_and_rounds_and_prints_nothing(tmp_path, caplog, capsys) -> None:
    config = LotteryTicketConfig(density=0.5, prune_fraction=0.5, target_modules=TARGETS)

    def search(folder: str, verbose: bool) -> list[str]:
        caplog.clear()
        find_lottery_ticket(tiny_mlp(), config, Recorder(steps=1), output_dir=tmp_path / folder, verbose=verbose)
        return [r.getMessage() for r in caplog.records if r.name == "drt_peft.lottery" and r.levelno == logging.INFO]

    with caplog.at_level(logging.INFO, logger="drt_peft"):
        messages = search("configured", verbose=False)
    assert messages[0].startswith("lottery ticket: 1 pruning round(s) of 50%")
    assert messages[0].endswith("2 trainings at densities 1, 0.5")
    assert [m.split(":")[0] for m in messages[1:]] == ["round 0", "round 1"]
    assert messages[2].startswith("round 1: density 0.5, d = 36, metrics {'loss': ")
    # verbose shows the plan and the rounds whatever the logging level; without it they follow the level
    assert search("verbose", verbose=True) == messages
    assert search("quiet", verbose=False) == []
    assert logging.getLogger("drt_peft.lottery").level == logging.NOTSET, "verbose must restore the level"
    assert capsys.readouterr().out == ""


def test_final_ticket_saves_and_loads_like_any_adapter(tmp_path) -> None:
    config = LotteryTicketConfig(density=0.4, one_shot=True, target_modules=TARGETS)
    ticket = find_lottery_ticket(tiny_mlp(), config, Recorder(), output_dir=tmp_path, verbose=False)
    x = torch.randn(4, 6)
    assert_loads_identically(ticket, tiny_mlp(), tmp_path / "ticket", x)
    again = find_lottery_ticket(tiny_mlp(), config, Recorder(fail_at_round=0), output_dir=tmp_path, verbose=False)
    torch.testing.assert_close(again(x), ticket(x), rtol=0, atol=0)


def test_lamp_scores_match_the_formula() -> None:
    w = torch.tensor([[0.5, -2.0], [1.0, 3.0]])
    squares = sorted(float(v) ** 2 for v in w.reshape(-1))
    expected = {s: s / sum(t for t in squares if t >= s) for s in squares}
    got = lamp(w.abs())
    for value, score in zip(w.reshape(-1).tolist(), got.reshape(-1).tolist(), strict=True):
        assert score == pytest.approx(expected[value**2])
    config = LotteryTicketConfig(density=0.5, one_shot=True, layer_adaptive=True, target_modules=TARGETS)
    assert config.criterion.name == "lamp"


@pytest.mark.parametrize("config_class", [LotteryTicketConfig, PruneOrFreezeConfig])
def test_trainer_drives_the_rounds_of_a_bert(tmp_path, config_class) -> None:

    g = torch.Generator().manual_seed(0)
    batch = random_bert_batch(g, size=8)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(8)]
    args = cpu_training_args(tmp_path / "trainer", max_steps=3, per_device_train_batch_size=4)
    model = tiny_bert()

    def accuracy(prediction) -> dict[str, float]:
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    trainer = Trainer(model=model, args=args, train_dataset=rows, eval_dataset=rows[:4], compute_metrics=accuracy)
    config = config_class(density=0.5, one_shot=True, rewind_step=1, modules_to_save=["classifier"])
    ticket = find_lottery_ticket(model, config, trainer=trainer, output_dir=tmp_path / "imp", verbose=False)
    state = json.loads((tmp_path / "imp" / "lottery_state.json").read_text())
    assert [r["density"] for r in state["rounds"]] == [1.0, 0.5]
    assert all({"eval_loss", "eval_accuracy"} <= set(r["metrics"]) for r in state["rounds"])  # the Trainer's own
    d = sum(layer.num_trainable for _, layer in ticket.drt_layers())
    total = sum(layer.weight_shape.numel() for _, layer in ticket.drt_layers())
    assert d == round(0.5 * total)
    batch = {k: v[:4] for k, v in random_bert_batch(g).items() if k != "labels"}
    assert_loads_identically(ticket.eval(), tiny_bert(), tmp_path / "imp" / "ticket", batch)


def test_bad_config_values_are_named() -> None:
    with pytest.raises(ValueError, match=r"prune_fraction=1\.5"):
        LotteryTicketConfig(density=0.1, prune_fraction=1.5)
    with pytest.raises(ValueError, match=r"rewind_step=-1"):
        LotteryTicketConfig(density=0.1, rewind_step=-1)
    with pytest.raises(ValueError, match=r"budget='erk'"):
        LotteryTicketConfig(density=0.1, budget="erk")
    with pytest.raises(ValueError, match="needs density"):
        LotteryTicketConfig(num_trainable=10)


def test_prune_or_freeze_partitions_dropped_weights_by_direction(tmp_path) -> None:
    model = tiny_mlp()
    init = {n: model.get_submodule(n).weight.detach().clone() for n in TARGETS}
    config = PruneOrFreezeConfig(density=0.3, target_modules=TARGETS)
    train = Recorder()
    ticket = find_lottery_ticket(model, config, train, output_dir=tmp_path, verbose=False)
    moved_toward_zero = 0
    for name, layer in ticket.drt_layers():
        trained = train.after_step[train.steps][name]  # the dense round's final values, all entries
        theta = layer.effective_weight().reshape(-1)
        kept = torch.zeros_like(trained, dtype=torch.bool)
        kept[layer.drt_indices] = True
        toward_zero = trained.abs() < init[name].reshape(-1).abs()
        assert torch.equal(theta[~kept & toward_zero], torch.zeros_like(theta[~kept & toward_zero]))
        torch.testing.assert_close(theta[~kept & ~toward_zero], init[name].reshape(-1)[~kept & ~toward_zero])
        assert torch.equal(layer.drt_pruned, torch.nonzero(~kept & toward_zero).flatten())
        moved_toward_zero += int((~kept & toward_zero).sum())
    assert moved_toward_zero > 0
    x = torch.randn(4, 6)
    assert_loads_identically(ticket, tiny_mlp(), tmp_path / "ticket", x)
    restored = ticket.unload()
    for name in TARGETS:
        assert torch.equal(restored.get_submodule(name).weight, init[name])
    with pytest.raises(ValueError, match="mode='prune'"):
        PruneOrFreezeConfig(density=0.3, mode="prune")


@pytest.mark.parametrize("config_class", [LotteryTicketConfig, PruneOrFreezeConfig])
def test_tickets_on_a_vision_transformer(tmp_path, config_class) -> None:
    batch = random_vit_batch(torch.Generator().manual_seed(0), size=4)

    def train_fn(model: DRTModel) -> dict[str, float]:
        return {"loss": train_steps(model, [batch] * 2)[-1]}

    config = config_class(density=0.25, one_shot=True, modules_to_save=["classifier"])
    ticket = find_lottery_ticket(tiny_vit(), config, train_fn, output_dir=tmp_path, verbose=False)
    d = sum(layer.num_trainable for _, layer in ticket.drt_layers())
    assert d == round(0.25 * sum(layer.weight_shape.numel() for _, layer in ticket.drt_layers()))
    assert_loads_identically(ticket.eval(), tiny_vit(), tmp_path / "ticket", batch)
