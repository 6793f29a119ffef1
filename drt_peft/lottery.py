"""The lottery-ticket search: iterative magnitude pruning around the user's own training.

Each round builds the current sub-network on the base model, lets ``train_fn`` (or a copy of an
HF ``Trainer``) train it, records the round and derives the next mask from the trained
magnitudes. The search lives in ``output_dir``:

- ``lottery_state.json`` — the config, the planned densities and one record per finished round
  (density, d, the metrics ``train_fn`` returned, a checksum of ψ), written atomically after
  the round's adapter, so it only ever names complete rounds;
- ``round-<r>/`` — the trained adapter of round r (its ψ and ϑ), from which the next mask is
  derived when the search resumes;
- ``rewind.safetensors`` — Θ(k) when ``rewind_step = k > 0``;
- ``ticket/`` — the final, trained ticket, saved like any adapter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .checkpoint.io import indices_checksum, under_prefix
from .files import atomic_write_bytes
from .logging import shown
from .masks import select_masks
from .masks.criteria.basic import lamp
from .masks.selection import indices_of
from .methods.lottery_ticket import LotteryTicketConfig
from .model import DRTModel
from .targeting import Target

STATE_NAME = "lottery_state.json"
REWIND_NAME = "rewind.safetensors"
TrainFn = Callable[[DRTModel], "dict[str, Any] | None"]

logger = logging.getLogger(__name__)


def find_lottery_ticket(
    model: nn.Module,
    config: LotteryTicketConfig,
    train_fn: TrainFn | None = None,
    *,
    trainer: Any = None,
    output_dir: str | os.PathLike,
    verbose: bool = True,
) -> DRTModel:
    """Run iterative magnitude pruning (Frankle & Carbin 2019) and return the trained ticket.

    Args:
        model: the base model at Θ(0) (pretrained or freshly initialised); every round starts from it.
        config: the search (final ``density``, ``prune_fraction``, ``rewind_step``, ``one_shot``, ...).
        train_fn: ``train_fn(drt_model) -> metrics`` trains one round in place; it must call
            ``drt_model.update_masks(step, optimizer)`` after each optimizer step when ``rewind_step > 0``.
        trainer: instead of ``train_fn``, an HF ``Trainer``: each round trains a new trainer of the
            same class, arguments, data, metrics and user callbacks, plus :class:`~drt_peft.DRTCallback`;
            the round's metrics are ``evaluate()``'s when it has an eval dataset, else the training loss.
        output_dir: where rounds are recorded; a search found there resumes after its last finished round.
        verbose: show the plan up front and one line per round: they are logged at INFO to the
            ``drt_peft.lottery`` logger, and ``verbose`` makes sure they are shown (see
            :func:`drt_peft.logging.shown`); without it they follow the logging configuration.
    """
    if (train_fn is None) == (trainer is None):
        raise ValueError("pass exactly one of train_fn and trainer")
    if not isinstance(config, LotteryTicketConfig):
        raise TypeError(f"config must be a LotteryTicketConfig, got {type(config).__name__}")
    run = train_fn if train_fn is not None else _trainer_round(trainer)
    with shown(logger) if verbose else contextlib.nullcontext():
        return _search(model, config, run, os.fspath(output_dir))


def _search(model: nn.Module, config: LotteryTicketConfig, run: TrainFn, output_dir: str) -> DRTModel:
    """The rounds of :func:`find_lottery_ticket`, resumed after the last one ``output_dir`` records."""
    os.makedirs(output_dir, exist_ok=True)
    densities = config.round_densities()
    state = _load_state(output_dir, config, densities)
    done = len(state["rounds"])
    logger.info(_plan(config, densities, done, output_dir))
    if done == len(densities):
        return DRTModel.from_pretrained(model, os.path.join(output_dir, "ticket"), is_trainable=True)
    rewind = _load_rewind(output_dir) if config.rewind_step and done else None
    indices = carried = None
    if done:
        previous = DRTModel.from_pretrained(model, _round_dir(output_dir, done - 1))
        indices = _next_indices(config, previous, densities[done])
        carried = previous.drt_policy.carry_over(previous, indices)
        previous.unload()
    for r in range(done, len(densities)):
        final = r == len(densities) - 1
        drt = DRTModel(model, dataclasses.replace(config, density=densities[r]), indices=indices)
        if carried is not None:
            drt.drt_policy.restore(drt, carried)
        if rewind is not None:
            _apply_rewind(drt, rewind)
        metrics = run(drt) or {}
        if r == 0 and config.rewind_step:
            rewind = _keep_rewind(drt, config, output_dir)
        record = _record_round(drt, r, densities[r], metrics, state, output_dir, final)
        logger.info(f"round {r}: density {densities[r]:.4g}, d = {record['d']:,}, metrics {record['metrics']}")
        if final:
            return drt
        indices = _next_indices(config, drt, densities[r + 1])
        carried = drt.drt_policy.carry_over(drt, indices)
        drt.unload()
    raise AssertionError("unreachable: the last round returns")


def _plan(config: LotteryTicketConfig, densities: list[float], done: int, output_dir: str) -> str:
    """The search announced up front: rounds, the eq. 18 count, the densities, where it resumes."""
    return (
        f"lottery ticket: {config.num_rounds} pruning round(s) of {config.prune_fraction:.0%} "
        f"(⌈log({config.density:g}) / log({1 - config.prune_fraction:g})⌉, survey eq. 18) to density "
        f"{config.density:g}: {len(densities)} trainings at densities {', '.join(f'{d:.4g}' for d in densities)}"
        + (f"; resuming after round {done - 1} from {output_dir}" if done else "")
    )


def _keep_rewind(drt: DRTModel, config: LotteryTicketConfig, output_dir: str) -> dict[str, torch.Tensor]:
    """Θ(k) as the dense round recorded it at step ``rewind_step``, written next to the rounds."""
    rewind = drt.drt_policy.rewind_snapshot(drt)
    if rewind is None:
        raise RuntimeError(
            f"rewind_step={config.rewind_step} but the dense round never reached optimizer step "
            f"{config.rewind_step} through model.update_masks(step, optimizer) (or DRTCallback)"
        )
    tensors = {key: value.detach().cpu().contiguous() for key, value in rewind.items()}
    atomic_write_bytes(os.path.join(output_dir, REWIND_NAME), safetensors_bytes(tensors))
    return rewind


def _record_round(
    drt: DRTModel, r: int, density: float, metrics: dict[str, Any], state: dict, output_dir: str, final: bool
) -> dict[str, Any]:
    """Save the round's adapter (the ticket, for the last round), then append the round to the state file."""
    drt.save_pretrained(os.path.join(output_dir, "ticket") if final else _round_dir(output_dir, r))
    layers = [layer for _, layer in drt.drt_layers()]
    record = {
        "round": r,
        "density": density,
        "d": sum(layer.num_trainable for layer in layers),
        "metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
        "mask_checksum": indices_checksum(layer.drt_indices for layer in layers),
    }
    state["rounds"].append(record)
    atomic_write_bytes(os.path.join(output_dir, STATE_NAME), json.dumps(state, indent=2).encode())
    return record


def _round_dir(output_dir: str, r: int) -> str:
    return os.path.join(output_dir, f"round-{r}")


def _load_state(output_dir: str, config: LotteryTicketConfig, densities: list[float]) -> dict:
    path = os.path.join(output_dir, STATE_NAME)
    fresh = {"config": config.to_dict(), "densities": densities, "rounds": []}
    if not os.path.exists(path):
        return fresh
    with open(path) as handle:
        state = json.load(handle)
    keep = ("base_model_fingerprint", "base_model_name_or_path", "revision")
    # a field missing from a record written before it existed has its default (e.g. autocast_adapter_dtype)
    defaults = {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
    mine = {k: v for k, v in config.to_dict().items() if k not in keep}
    theirs = {k: v for k, v in {**defaults, **state.get("config", {})}.items() if k not in keep}
    if mine != theirs:
        changed = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        raise ValueError(
            f"{path} records a search with a different config (fields {changed} differ); "
            "use another output_dir or the same config to resume it"
        )
    return state


def _load_rewind(output_dir: str) -> dict[str, torch.Tensor]:
    path = os.path.join(output_dir, REWIND_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: it holds Θ(k) for rewind_step, saved after the dense round")
    return load_file(path)


def _apply_rewind(drt: DRTModel, rewind: dict[str, torch.Tensor]) -> None:
    """Set ϑ to Θ(k) at the current ψ, trained biases and ``modules_to_save`` to their state at step k."""
    with torch.no_grad():
        for name, layer in drt.drt_layers():
            layer.drt_values.copy_(rewind[f"drt.{name}"].to(layer.drt_values)[layer.drt_indices])
            if f"bias.{name}" in rewind and layer.trained_bias() is not None:
                layer.base_layer.bias.copy_(rewind[f"bias.{name}"])
        for name in drt.modules_to_save:
            state = under_prefix(rewind, f"save.{name}.")
            drt.get_base_model().get_submodule(name).load_state_dict(state)


def _next_indices(config: LotteryTicketConfig, drt: DRTModel, density: float) -> list[torch.Tensor]:
    """ψ of the next round: the largest trained |ϑ| (or their LAMP scores) among the survivors."""
    targets, scores = [], []
    for name, layer in drt.drt_layers():
        magnitude = torch.zeros(layer.weight_shape, dtype=torch.float64)
        magnitude.view(-1)[layer.drt_indices.cpu()] = layer.drt_values.detach().double().abs().cpu()
        score = lamp(magnitude) if config.layer_adaptive else magnitude
        alive = torch.zeros(layer.weight_shape, dtype=torch.bool)
        alive.view(-1)[layer.drt_indices.cpu()] = True
        scores.append(score.masked_fill(~alive, float("-inf")))
        targets.append(Target(name, layer.base_layer, layer.op))
    masks = select_masks(targets, config, scores, density=density)
    return [indices_of(mask) for mask in masks]


def _trainer_round(trainer: Any) -> TrainFn:
    """A ``train_fn`` that trains each round with a fresh copy of ``trainer``'s set-up."""
    from .trainer import DRTCallback

    user_callbacks = [
        cb for cb in trainer.callback_handler.callbacks if not type(cb).__module__.startswith("transformers.")
    ]

    def train(model: DRTModel) -> dict[str, Any]:
        round_trainer = type(trainer)(
            model=model,
            args=trainer.args,
            data_collator=trainer.data_collator,
            train_dataset=trainer.train_dataset,
            eval_dataset=trainer.eval_dataset,
            processing_class=trainer.processing_class,
            compute_metrics=trainer.compute_metrics,
            callbacks=[*user_callbacks, DRTCallback()],
        )
        output = round_trainer.train()
        return round_trainer.evaluate() if trainer.eval_dataset is not None else {"train_loss": output.training_loss}

    return train
