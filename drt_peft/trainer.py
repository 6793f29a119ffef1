"""Hugging Face ``Trainer`` integration."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .checkpoint.io import TRAINING_STATE_NAME, WEIGHTS_NAME, load_training_state, save_training_state
from .model import DRTModel


def unwrap_drt_model(model: nn.Module) -> DRTModel:
    """The :class:`DRTModel` inside ``model`` (itself, or under DDP/accelerate ``.module`` wrappers)."""
    while not isinstance(model, DRTModel):
        if not isinstance(getattr(model, "module", None), nn.Module):
            raise TypeError(f"expected a DRTModel (from get_drt_model), got {type(model).__name__}")
        model = model.module
    return model


class DRTCallback(TrainerCallback):
    """Runs :meth:`DRTModel.update_masks` after every optimizer step of a ``Trainer``, logs the DRT
    statistics and writes the compact adapter into every checkpoint.

    Needed by methods with a per-step policy (FreezeNet's frozen decay; dynamic sparse training)::

        Trainer(model=model, args=args, train_dataset=data, callbacks=[DRTCallback()])

    Each ``checkpoint-N`` gets ``adapter_model.safetensors`` (so ``DRTModel.from_pretrained`` loads
    it) and ``drt_training_state.safetensors``; on resume the method is told the step it continues
    from, so the run goes on as if uninterrupted. Logs carry a summary (d, density, smallest and
    largest layer density, ITOP exploration); ``log_per_layer=True`` adds each layer's density.
    """

    def __init__(self, log_per_layer: bool = False) -> None:
        self.log_per_layer = log_per_layer

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any):
        drt = unwrap_drt_model(model)
        if state.max_steps:
            drt.drt_config.check_training_length(state.max_steps)
        drt.drt_policy.on_attach(drt, state.global_step)
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any):
        unwrap_drt_model(model).update_masks(state.global_step, kwargs.get("optimizer"))
        return control

    def on_save(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any):
        """Write the adapter and training state into the checkpoint, unless the trainer (a DRTTrainer) already did."""
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if args.should_save and os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, TRAINING_STATE_NAME)):
            drt = unwrap_drt_model(model)
            drt.save_pretrained(folder)
            save_training_state(drt, folder)
        return control

    def on_log(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, logs=None, **kwargs: Any):
        """Add :meth:`DRTModel.drt_statistics` to the recorded log entry (``trainer.state.log_history``)."""
        if logs is not None and state.log_history and "drt/density" not in logs:
            stats = unwrap_drt_model(model).drt_statistics(per_layer=self.log_per_layer)
            logs.update(stats)
            state.log_history[-1].update(stats)
        return control


class DRTTrainer(Trainer):
    """A ``Trainer`` for DRT models: runs :class:`DRTCallback`, puts the DRT statistics into every log (so
    reporting integrations see them too), and checkpoints compactly.

    ``save_model`` and every ``checkpoint-N`` hold the adapter (``adapter_model.safetensors``, what
    ``DRTModel.from_pretrained`` loads) and ``drt_training_state.safetensors`` (ψ, ϑ, optimizer-facing
    state of the method), never the frozen base weights; ``resume_from_checkpoint`` and
    ``load_best_model_at_end`` restore from them bit-identically.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if not any(isinstance(c, DRTCallback) or c is DRTCallback for c in callbacks):
            callbacks.append(DRTCallback())
        super().__init__(*args, callbacks=callbacks, **kwargs)

    def _drt_callback(self) -> DRTCallback:
        return next(c for c in self.callback_handler.callbacks if isinstance(c, DRTCallback))

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        logs.update(unwrap_drt_model(self.model).drt_statistics(per_layer=self._drt_callback().log_per_layer))
        super().log(logs, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        drt = unwrap_drt_model(self.accelerator.unwrap_model(self.model, keep_torch_compile=False))
        drt.save_pretrained(output_dir, state_dict=state_dict, is_main_process=self.args.should_save)
        if not self.args.should_save:
            return
        save_training_state(drt, output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if not os.path.isfile(os.path.join(resume_from_checkpoint, TRAINING_STATE_NAME)):
            if os.path.isfile(os.path.join(resume_from_checkpoint, WEIGHTS_NAME)):
                raise ValueError(
                    f"{resume_from_checkpoint} holds an adapter but no {TRAINING_STATE_NAME}; it cannot be resumed "
                    "from. Load the adapter with DRTModel.from_pretrained(base_model, path, is_trainable=True) instead"
                )
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_training_state(unwrap_drt_model(model if model is not None else self.model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_training_state(unwrap_drt_model(self.model), self.state.best_model_checkpoint)
