"""Hugging Face ``Trainer`` integration."""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import TrainerCallback

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
    """

    def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any):
        unwrap_drt_model(model).update_masks(state.global_step, kwargs.get("optimizer"))
        return control
