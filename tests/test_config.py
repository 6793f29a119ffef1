"""Bad configuration input fails early with a message naming the field, the value and what is allowed."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from drt_peft import DRTConfig, MagnitudeConfig, RandomConfig, available_methods
from drt_peft.config import register_method


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"density": 0.0}, r"density=0\.0 is out of range; it must satisfy 0 < density <= 1"),
        ({"density": 1.5}, r"density=1\.5 is out of range"),
        ({"density": -0.1}, r"density=-0\.1 is out of range"),
        ({}, r"set exactly one of density and num_trainable"),
        ({"density": 0.1, "num_trainable": 5}, r"set exactly one of density and num_trainable"),
        ({"num_trainable": 0}, r"num_trainable=0 must be a positive integer"),
        ({"density": 0.1, "mode": "sparse"}, r"mode='sparse' is not supported; use one of \['freeze', 'prune'\]"),
        (
            {"density": 0.1, "budget": "layerwise"},
            r"budget='layerwise' is not supported; use one of \['global', 'uniform', 'erk'\]",
        ),
        ({"density": 0.1, "base_init": "zeros"}, r"base_init='zeros' is not supported"),
        ({"density": 0.1, "bias": "lora_only"}, r"bias='lora_only' is not supported; use one of \['none', 'all'\]"),
        (
            {"density": 0.1, "structure": "blocks"},
            r"structure='blocks' is not supported; use 'unstructured', 'rows' or an N:M",
        ),
        ({"density": 0.1, "structure": "4:2"}, r"structure='4:2': N:M needs 0 < N <= M"),
        ({"density": 0.1, "seed": -1}, r"seed=-1 must be an integer with 0 <= seed < 2\*\*32"),
        (
            {"density": 0.1, "target_modules": "(unclosed"},
            r"target_modules='\(unclosed' is not a valid regular expression",
        ),
        ({"density": 0.1, "target_modules": []}, r"target_modules=\[\] must be a non-empty list"),
    ],
)
def test_bad_config_raises(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RandomConfig(**kwargs)


def test_base_config_is_abstract() -> None:
    with pytest.raises(TypeError, match="DRTConfig is abstract"):
        DRTConfig(density=0.1)


def test_registry_and_nm_parsing() -> None:
    assert {"random", "magnitude"} <= set(available_methods())
    assert MagnitudeConfig(density=0.5, structure="2:4").nm == (2, 4)
    assert RandomConfig(density=0.5).nm is None
    assert RandomConfig(density=0.1).to_dict()["method"] == "random"


def test_configs_are_frozen_data() -> None:
    config = RandomConfig(density=0.1, target_modules=["0", "2"], modules_to_save="classifier")
    assert config.target_modules == ("0", "2") and config.modules_to_save == ("classifier",)  # canonical forms
    assert hash(config) == hash(RandomConfig(density=0.1, target_modules=("0", "2"), modules_to_save=["classifier"]))
    assert config.to_dict()["target_modules"] == ["0", "2"]  # JSON-ready
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.density = 0.2  # type: ignore[misc]
    changed = dataclasses.replace(config, density=0.2)
    assert (changed.density, config.density) == (0.2, 0.1)
    assert DRTConfig.from_dict(changed.to_dict()) == changed
    with pytest.raises(ValueError, match=r"density=2 is out of range"):
        dataclasses.replace(config, density=2)  # a copy is validated like a new config


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Methods registered by a test stay in a copy of the registry, dropped after it."""
    import drt_peft.config

    monkeypatch.setattr(drt_peft.config, "_METHODS", dict(drt_peft.config._METHODS))


@pytest.mark.usefixtures("scratch_registry")
def test_a_config_names_its_criterion_by_reference() -> None:
    from drt_peft import SNIPConfig
    from drt_peft.masks.criteria.gradient import snip_scores

    assert SNIPConfig.criterion is snip_scores and snip_scores.name == "snip"
    with pytest.raises(TypeError, match=r"ByNameConfig\.criterion='snip': name the criterion by reference"):

        @register_method("by_name")
        @dataclasses.dataclass(frozen=True)
        class ByNameConfig(DRTConfig):
            criterion = "snip"

    assert "by_name" not in available_methods()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"modules_to_save": ["classifier", 3]}, r"modules_to_save=\['classifier', 3\] must be module names"),
        ({"inference_mode": "yes"}, r"inference_mode='yes' must be True or False"),
    ],
)
def test_more_bad_fields_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RandomConfig(density=0.1, **kwargs)


@pytest.mark.usefixtures("scratch_registry")
def test_register_method_refuses_configs_that_would_lose_data_or_behaviour() -> None:
    from drt_peft.criterion import Criterion
    from drt_peft.masks.criteria.gradient import snip_scores

    with pytest.raises(TypeError, match=r"Undecorated: declare a method config with @dataclass\(frozen=True\)"):

        @register_method("undecorated")
        class Undecorated(RandomConfig):
            extra: int = 3

    with pytest.raises(TypeError, match=r"\['criterion'\] are class attributes, not fields"):

        @register_method("annotated")
        @dataclasses.dataclass(frozen=True)
        class Annotated(DRTConfig):
            criterion: Criterion = snip_scores

    with pytest.raises(TypeError, match=r"Wrapped\.criterion=.*name the criterion by reference"):

        @register_method("wrapped")
        @dataclasses.dataclass(frozen=True)
        class Wrapped(DRTConfig):
            criterion = staticmethod(lambda scoring: [])

    with pytest.raises(TypeError, match=r"NoPolicy\.policy=.* must be a subclass of drt_peft\.policy\.Policy"):

        @register_method("no_policy")
        @dataclasses.dataclass(frozen=True)
        class NoPolicy(DRTConfig):
            criterion = snip_scores
            policy = object

    assert not {"undecorated", "annotated", "wrapped", "no_policy"} & set(available_methods())


@pytest.mark.usefixtures("scratch_registry")
def test_a_paper_setting_names_fields_and_is_never_inherited() -> None:
    from drt_peft import SNIPConfig
    from drt_peft.config import setting

    with pytest.raises(TypeError, match=r"Typo\.paper_setting=.*\['bugdet'\] are not fields"):

        @register_method("typo")
        @dataclasses.dataclass(frozen=True)
        class Typo(RandomConfig):
            paper_setting = setting(bugdet="global")

    @register_method("snip_variant")
    @dataclasses.dataclass(frozen=True)
    class SNIPVariantConfig(SNIPConfig):
        """Another paper's method on SNIP's fields: SNIP's setting is not its own."""

    with pytest.raises(NotImplementedError, match="SNIPVariantConfig records no paper setting"):
        SNIPVariantConfig.as_in_paper(density=0.1)
    assert SNIPConfig.as_in_paper(density=0.1).budget == "global"
    with pytest.raises(TypeError):
        SNIPConfig.paper_setting["budget"] = "uniform"  # read-only


@pytest.mark.usefixtures("scratch_registry")
def test_a_new_method_is_a_criterion_a_config_and_a_policy(tmp_path) -> None:
    """The example of docs/api.md: a criterion, a frozen config naming it, and a policy with checkpointed state."""
    from conftest import adamw, tiny_mlp

    from drt_peft import DRTModel, get_drt_model
    from drt_peft.masks import criterion
    from drt_peft.policy import Policy

    @criterion("weight_squared")
    def weight_squared(scoring):
        return [t.weight.detach().float() ** 2 for t in scoring.targets]

    class CountingPolicy(Policy):
        def on_attach(self, model, step=0):
            if not hasattr(self, "steps"):
                self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

        def on_step(self, model, step, optimizer):
            self.steps += 1
            return {"steps": float(self.steps)}

    @register_method("weight_squared_test")
    @dataclasses.dataclass(frozen=True)
    class WeightSquaredConfig(DRTConfig):
        criterion = weight_squared
        policy = CountingPolicy

    base = tiny_mlp()
    weight = base[0].weight.detach().clone()
    model = get_drt_model(base, WeightSquaredConfig(density=0.25, target_modules=["0"]))
    mask = model.get_masks()["0"]
    assert mask.sum() == 12 and bool((weight[mask] ** 2).min() >= (weight[~mask] ** 2).max())
    optimizer = adamw(model)
    assert [model.update_masks(step, optimizer)["steps"] for step in (1, 2)] == [1.0, 2.0]
    assert int(model.training_state_dict()["drt_policy.steps"]) == 2
    model.save_pretrained(tmp_path)
    loaded = DRTModel.from_pretrained(tiny_mlp(), tmp_path)
    assert type(loaded.drt_policy) is CountingPolicy and torch.equal(loaded.get_masks()["0"], mask)
