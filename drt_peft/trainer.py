"""Hugging Face ``Trainer`` integration."""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import Trainer, TrainerCallback

from .model import DRTModel


def unwrap_drt_model(model: nn.Module) -> DRTModel:
    """The :class:`DRTModel` inside ``model`` (itself, or under DDP/accelerate ``.module`` wrappers)."""
    while not isinstance(model, DRTModel):
        if not isinstance(getattr(model, "module", None), nn.Module):
            raise TypeError(f"expected a DRTModel (from get_drt_model), got {type(model).__name__}")
        model = model.module
    return model


class DRTCallback(TrainerCallback):
    """Runs :meth:`DRTModel.update_masks` after every optimizer step of a ``Trainer``.

    Needed by methods with a per-step policy (FreezeNet's frozen decay; dynamic sparse training)::

        Trainer(model=model, args=args, train_dataset=data, callbacks=[DRTCallback()])

    Masks, values and optimizer state travel in the Trainer's checkpoints; on resume the method
    is told the step it continues from, so the run goes on as if uninterrupted.
    """

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any):
        drt = unwrap_drt_model(model)
        t_end = getattr(drt.drt_config, "t_end", None)
        if t_end is not None and state.max_steps and t_end > state.max_steps:
            raise ValueError(
                f"t_end={t_end} is beyond the training length (max_steps={state.max_steps}); "
                f"set t_end <= {state.max_steps}, e.g. 75% of the steps as in RigL"
            )
        drt.drt_config.on_attach(drt, state.global_step)
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any):
        unwrap_drt_model(model).update_masks(state.global_step, kwargs.get("optimizer"))
        return control

    def on_log(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, logs=None, **kwargs: Any):
        """Add :meth:`DRTModel.drt_statistics` to the recorded log entry (``trainer.state.log_history``)."""
        if logs is not None and state.log_history and "drt/density" not in logs:
            stats = unwrap_drt_model(model).drt_statistics()
            logs.update(stats)
            state.log_history[-1].update(stats)
        return control


class DRTTrainer(Trainer):
    """A ``Trainer`` that runs :class:`DRTCallback` and puts the DRT statistics (density, ITOP
    exploration rate, per-layer densities) into every log, so reporting integrations see them too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if not any(isinstance(c, DRTCallback) or c is DRTCallback for c in callbacks):
            callbacks.append(DRTCallback())
        super().__init__(*args, callbacks=callbacks, **kwargs)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        logs.update(unwrap_drt_model(self.model).drt_statistics())
        super().log(logs, *args, **kwargs)
