"""Bad configuration input fails early with a message naming the field, the value and what is allowed."""

from __future__ import annotations

import pytest

from drt_peft import DRTConfig, MagnitudeConfig, RandomConfig, available_methods


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
