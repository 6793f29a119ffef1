"""Several adapters on one base: add, load, switch, disable, delete, save, and compose them."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import adamw, outputs, random_bert_batch, tiny_bert, tiny_mlp, train_steps
from torch import nn

from drt_peft import (
    ComposedConfig,
    DRTModel,
    FreezeNetConfig,
    RandomConfig,
    SNIPConfig,
    SupermaskConfig,
    get_drt_model,
)


def _batches(seed: int, n: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [random_bert_batch(g) for _ in range(n)]


INPUTS = {"input_ids": _batches(99, 1)[0]["input_ids"]}


def _trained(config, seed: int) -> DRTModel:
    """A tiny BERT with ``config``, trained three steps on batches drawn from ``seed``."""
    model = get_drt_model(tiny_bert(), config, calibration_data=_batches(seed))
    train_steps(model, _batches(seed))
    return model


A = RandomConfig(density=0.1, seed=1, modules_to_save=["classifier"], bias="all")
B = SNIPConfig(density=0.05, modules_to_save=["classifier"], mode="prune")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Two adapters trained alone on their own models, saved; their outputs on ``INPUTS``."""
    folder = tmp_path_factory.mktemp("adapters")
    found: dict[str, object] = {"base": outputs(tiny_bert(), INPUTS)}
    for name, config, seed in (("a", A, 1), ("b", B, 2)):
        model = _trained(config, seed)
        model.save_pretrained(folder / name)
        found[name], found[f"{name}_dir"] = outputs(model, INPUTS), folder / name
    return found


def test_adapters_on_one_base_compute_exactly_as_alone(saved: dict) -> None:
    model = DRTModel.from_pretrained(tiny_bert(), saved["a_dir"], adapter_name="a")
    model.load_adapter(saved["b_dir"], "b")
    assert model.active_adapter == "a" and list(model.adapters) == ["a", "b"]
    assert torch.equal(outputs(model, INPUTS), saved["a"])
    model.set_adapter("b")
    assert model.active_adapters == ["b"] and torch.equal(outputs(model, INPUTS), saved["b"])
    model.set_adapter("a")
    assert torch.equal(outputs(model, INPUTS), saved["a"])
    with model.disable_adapter():
        assert torch.equal(outputs(model, INPUTS), saved["base"])
    model.delete_adapter("a")
    assert model.active_adapter == "b" and torch.equal(outputs(model, INPUTS), saved["b"])
    assert torch.equal(outputs(model.unload(), INPUTS), saved["base"])


def test_an_added_adapter_is_scored_on_the_base_and_trains_on_its_own(saved: dict) -> None:
    model = DRTModel.from_pretrained(tiny_bert(), saved["a_dir"], adapter_name="a", is_trainable=True)
    model.add_adapter("b", B, calibration_data=_batches(2))
    assert torch.equal(outputs(model, INPUTS), saved["a"])  # adding leaves the active adapter as it was
    model.set_adapter("b")
    alone = get_drt_model(tiny_bert(), B, calibration_data=_batches(2))
    assert torch.equal(
        model.get_masks()["bert.encoder.layer.0.attention.self.query"],
        alone.get_masks()["bert.encoder.layer.0.attention.self.query"],
    )
    train_steps(model, _batches(2))
    assert torch.equal(outputs(model, INPUTS), saved["b"])
    model.set_adapter("a")
    assert torch.equal(outputs(model, INPUTS), saved["a"])  # training b left a untouched


def test_save_pretrained_writes_every_adapter_or_the_selected_ones(saved: dict, tmp_path) -> None:
    model = DRTModel.from_pretrained(tiny_bert(), saved["a_dir"])
    model.load_adapter(saved["b_dir"], "b")
    model.save_pretrained(tmp_path / "all")
    assert {"adapter_model.safetensors", "b"} <= set(os.listdir(tmp_path / "all"))
    model.save_pretrained(tmp_path / "only_b", selected_adapters=["b"])
    assert os.listdir(tmp_path / "only_b") == ["b"]
    again = DRTModel.from_pretrained(tiny_bert(), tmp_path / "all")
    again.load_adapter(tmp_path / "only_b" / "b", "b")
    again.set_adapter("b")
    assert torch.equal(outputs(again, INPUTS), saved["b"]) and model.active_adapter == "default"
    with pytest.raises(ValueError, match=r"selected_adapters=\['c'\]: name adapters of this model, \['default', 'b'\]"):
        model.save_pretrained(tmp_path / "none", selected_adapters=["c"])


def test_a_loaded_adapter_stays_frozen_unless_trainable(saved: dict) -> None:
    model = get_drt_model(tiny_bert(), A)
    model.load_adapter(saved["b_dir"], "frozen")
    model.load_adapter(saved["b_dir"], "trainable", is_trainable=True)
    model.set_adapter("frozen")
    assert not any(p.requires_grad for p in model.parameters())
    model.set_adapter("trainable")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("drt_values" in name or "classifier" in name for name in trainable)


def test_disable_adapter_keeps_training_with_the_same_optimizer() -> None:
    model = get_drt_model(tiny_bert(), A)
    base = outputs(tiny_bert(), INPUTS)
    optimizer = adamw(model, lr=1e-2)
    train_steps(model, _batches(1), optimizer=optimizer)
    with model.disable_adapter():
        assert torch.equal(outputs(model, INPUTS), base)
    before = outputs(model, INPUTS)
    train_steps(model, _batches(3), optimizer=optimizer)
    assert not torch.equal(outputs(model, INPUTS), before)  # the optimizer still holds the live values
    with model.disable_adapter():
        assert torch.equal(outputs(model, INPUTS), base)


def test_bad_adapter_calls_name_what_is_wrong() -> None:
    model = get_drt_model(tiny_bert(), A)
    with pytest.raises(ValueError, match=r"adapter_name='x' is not an adapter of this model; it has \['default'\]"):
        model.set_adapter("x")
    with pytest.raises(ValueError, match=r"adapter_name='default' exists already"):
        model.add_adapter("default", A)
    with pytest.raises(ValueError, match=r"adapter_name='a\.b' must be a non-empty string without"):
        model.add_adapter("a.b", A)
    with pytest.raises(ValueError, match=r"base_init='seeded' \(adapters \['s'\]\) re-draws the base weights"):
        model.add_adapter("s", SupermaskConfig(density=0.5))
    with pytest.raises(ValueError, match=r"'default' is the only adapter; call unload\(\)"):
        model.delete_adapter("default")
    assert list(model.adapters) == ["default"] and list(model.drt_layers())


def test_a_failed_add_leaves_the_active_adapter_as_it_was() -> None:
    model = get_drt_model(tiny_bert(), A)
    train_steps(model, _batches(1))
    before = outputs(model, INPUTS)
    with pytest.raises(ValueError, match="calibration"):
        model.add_adapter("snip", SNIPConfig(density=0.05))  # no calibration data
    assert list(model.adapters) == ["default"] and torch.equal(outputs(model, INPUTS), before)


def test_an_inactive_adapter_costs_its_values_and_indices_not_a_copy_of_the_base() -> None:
    model = get_drt_model(tiny_mlp((64, 64, 4)), RandomConfig(density=0.01, target_modules=["0"], mode="prune"))
    model.add_adapter("dense_prune", RandomConfig(density=0.2, target_modules=["0"], mode="prune"))
    layer = model._inactive["dense_prune"].aside.layers["0"]
    assert not layer.sparse_kernels  # a dense prune-mode layer: its D-sized buffer is freed while inactive
    held = sum(t.numel() for t in [*layer.parameters(recurse=False), *layer.buffers(recurse=False)])
    assert held <= 3 * layer.num_trainable < layer.base_layer.weight.numel()
    model.set_adapter("dense_prune")
    expected = torch.zeros(64, 64)
    expected.view(-1)[layer.drt_indices] = layer.drt_values.detach()
    assert torch.equal(layer.effective_weight(), expected)


# -- composition -------------------------------------------------------------------------------


def _two_task_data(task: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Task 0 reads inputs 0-2 and answers class 0 or 1, task 1 reads inputs 3-5 and answers class 1 or 2."""
    x = torch.zeros(256, 6)
    x[:, 3 * task : 3 * task + 3] = torch.randn(256, 3, generator=g)
    return x, (x.sum(1) > 0).long() + task


def _accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    x, y = data
    return float((outputs(model, x).argmax(1) == y).float().mean())


def test_composing_adapters_of_two_tasks_answers_both() -> None:
    g = torch.Generator().manual_seed(0)
    tasks = [_two_task_data(0, g), _two_task_data(1, g)]
    model = get_drt_model(tiny_mlp((6, 16, 3)), RandomConfig(density=0.5, bias="all"))
    for task, seed in ((0, 2), (1, 3)):
        model.add_adapter(f"task{task}", RandomConfig(density=0.3, seed=seed, bias="all"))
        model.set_adapter(f"task{task}")
        optimizer = adamw(model, lr=0.05)
        x, y = tasks[task]
        for _ in range(150):
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
    overlap = model.add_weighted_adapter(["task0", "task1"], [1.0, 1.0], "both")
    assert overlap["union"] > 0 and 0 <= overlap["jaccard:task0:task1"] < 1
    worst = {}
    for name in ("task0", "task1", "both"):
        model.set_adapter(name)
        worst[name] = min(_accuracy(model, data) for data in tasks)
    assert worst["both"] > max(worst["task0"], worst["task1"]) + 0.2, worst


def test_a_composition_of_one_adapter_reproduces_it_and_reloads(tmp_path) -> None:
    model = _trained(A, 1)
    expected = outputs(model, INPUTS)
    model.add_weighted_adapter(["default"], [1.0], "copy")
    model.set_adapter("copy")
    assert isinstance(model.drt_config, ComposedConfig) and model.drt_config.weights == (1.0,)
    assert torch.allclose(outputs(model, INPUTS), expected, rtol=1e-6, atol=1e-7)
    model.save_pretrained(tmp_path, selected_adapters=["copy"])
    loaded = DRTModel.from_pretrained(tiny_bert(), tmp_path / "copy")
    assert torch.equal(outputs(loaded, INPUTS), outputs(model, INPUTS))


def test_weights_scale_the_change_of_each_adapter() -> None:
    model = _trained(A, 1)
    name = "bert.encoder.layer.0.output.dense"
    layer = dict(model.drt_layers())[name]
    theta0, trained = layer.drt_base_values.clone(), layer.drt_values.detach().clone()
    model.add_weighted_adapter(["default", "default"], [0.25, 0.5], "scaled")
    model.set_adapter("scaled")
    composed = dict(model.drt_layers())[name]
    assert torch.allclose(composed.drt_values.detach(), theta0 + 0.75 * (trained - theta0), rtol=1e-6, atol=1e-7)


def test_composition_refuses_what_does_not_add_up(saved: dict) -> None:
    model = DRTModel.from_pretrained(tiny_bert(), saved["a_dir"], adapter_name="a")
    model.load_adapter(saved["b_dir"], "b")
    with pytest.raises(ValueError, match=r"composed adapters must share mode, got \{'a': 'freeze', 'b': 'prune'\}"):
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "ab")
    decaying = get_drt_model(
        tiny_bert(), FreezeNetConfig(density=0.1, frozen_weight_decay=0.1), calibration_data=_batches(1)
    )
    with pytest.raises(ValueError, match=r"is a FrozenDecayLayer: composition adds sparse changes"):
        decaying.add_weighted_adapter(["default"], [1.0], "x")
    with pytest.raises(ValueError, match=r"every weight must be a finite number"):
        model.add_weighted_adapter(["a"], [float("nan")], "nan")
    assert list(model.adapters) == ["a", "b"]


def test_disable_adapter_between_a_forward_and_its_backward_leaves_the_gradients_as_they_were() -> None:
    """The reference pass of DPO: the adapter's graph stays valid, its modules_to_save are swapped, not rewritten."""
    batch = _batches(1, 1)[0]
    grads = []
    for disable in (False, True):
        model = get_drt_model(tiny_bert(), A)
        train_steps(model, _batches(2))
        model.train()
        loss = model(**batch).loss
        if disable:
            with model.disable_adapter(), torch.no_grad():
                reference = model(**batch).loss
            assert reference != loss
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_moving_the_model_moves_its_inactive_adapters_too(saved: dict) -> None:
    model = DRTModel.from_pretrained(tiny_bert(), saved["a_dir"], adapter_name="a")
    model.load_adapter(saved["b_dir"], "b")
    model.double()
    expected = outputs(DRTModel.from_pretrained(tiny_bert().double(), saved["b_dir"]), INPUTS)
    model.set_adapter("b")
    assert all(t.dtype == torch.float64 for t in model.state_dict().values() if t.is_floating_point())
    assert torch.equal(outputs(model, INPUTS), expected)
    with model.disable_adapter():
        assert torch.equal(outputs(model, INPUTS), outputs(tiny_bert().double(), INPUTS))


def test_unload_after_switching_gives_the_flags_and_values_back() -> None:
    original = tiny_bert()
    flags = [p.requires_grad for p in original.parameters()]
    model = get_drt_model(tiny_bert(), A)
    train_steps(model, _batches(1))
    model.add_adapter("b", RandomConfig(density=0.1, seed=5))
    model.set_adapter("b")
    base = model.unload()
    assert [p.requires_grad for p in base.parameters()] == flags
    got, expected = base.state_dict(), original.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def test_moving_the_model_moves_an_inactive_layer_on_another_adapters_module() -> None:
    """Adapter b embeds the classifier that adapter a trains in full: b's layer wraps a copy outside the tree."""
    model = get_drt_model(tiny_bert(), A)
    model.add_adapter("b", RandomConfig(density=0.5, target_modules=["classifier"]))
    model.double()
    model.set_adapter("b")
    assert all(t.dtype == torch.float64 for t in model.state_dict().values() if t.is_floating_point())
    with model.disable_adapter():
        assert torch.equal(outputs(model, INPUTS), outputs(tiny_bert().double(), INPUTS))


def test_multi_adapter_models_with_dynamic_methods_pickle_and_keep_their_watch() -> None:
    import pickle

    from drt_peft import SETConfig

    model = get_drt_model(tiny_bert(), SETConfig(density=0.1, update_frequency=1))
    model.add_adapter("r", RandomConfig(density=0.1))
    copy = pickle.loads(pickle.dumps(model))
    assert list(copy.adapters) == ["default", "r"]
    batch = _batches(1, 1)[0]
    with pytest.warns(UserWarning, match=r"SETConfig changes the mask every 1 steps"):
        for _ in range(3):
            copy(**batch).loss.backward()


def test_a_folder_of_several_adapters_names_them_when_loaded_as_one(saved: dict, tmp_path) -> None:
    model = DRTModel.from_pretrained(tiny_bert(), saved["a_dir"], adapter_name="a")
    model.load_adapter(saved["b_dir"], "b")
    model.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"it holds adapters in the sub-folders \['a', 'b'\]"):
        DRTModel.from_pretrained(tiny_bert(), tmp_path)


def test_composition_errors_say_what_differs(saved: dict) -> None:
    model = get_drt_model(tiny_bert(), A)
    model.add_adapter("query", RandomConfig(density=0.1, target_modules=["query"]))
    with pytest.raises(ValueError, match=r"must target the same layers; \['query'\] target other layers"):
        model.add_weighted_adapter(["default", "query"], [1.0, 1.0], "x")
    with pytest.raises(ValueError, match=r"name at least one adapter and give one weight per adapter"):
        model.add_weighted_adapter([], [], "x")
