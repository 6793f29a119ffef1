"""A method's behaviour on the model it is attached to, and the state it keeps for that.

A config (:class:`~drt_peft.DRTConfig`) is data: frozen, serialisable, the same on every process.
What a method *does* lives in its :class:`Policy`, which the config names by reference
(``DRTConfig.policy``) and ``DRTModel`` builds and owns as ``model.drt_policy`` (as PEFT pairs
``LoraConfig`` with ``LoraModel``, and jaxpruner an updater with its state). The policy builds
each layer, acts when the model is attached and after each optimizer step, and keeps whatever
state the method carries (DSR's threshold, SNFS's momentum, the ITOP exploration bitmap, the
lottery's rewind snapshot) as buffers of its own: they move with ``model.to(...)`` and travel in
``DRTModel.training_state_dict``. Register them in ``on_attach`` on the layers' device; a buffer
registered later (at some step) is registered again when a checkpoint holding it is loaded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .layer import BaseDRTLayer, DRTLayer


class Policy(nn.Module):
    """The behaviour of a static method: it builds :class:`~drt_peft.DRTLayer` embeddings and does nothing during
    training. Methods that do more subclass it and override the hooks they need."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        #: The method's :class:`~drt_peft.DRTConfig` (the policy sits below the configs, which name it by
        #: reference); ``DRTModel.drt_config`` reads it from here.
        self.config = config

    @property
    def needs_optimizer(self) -> bool:
        """Whether :meth:`on_step` needs the optimizer that trains the values: it moves ψ (and their optimizer
        state with it) or reads the learning rate. ``DRTModel.update_masks`` then refuses to run without it."""
        return False

    @property
    def rescores_during_training(self) -> bool:
        """Whether the method scores ``calibration_data`` again during training (the model then keeps it)."""
        return False

    def build_layer(self, module: nn.Module, indices: Tensor) -> BaseDRTLayer:
        """The layer that embeds ``module`` with trained entries ψ = ``indices``.

        Methods whose embedding adds to Θ = ψ·ϑ + χ·Θ(0) (a fixed transform, learned scores) or
        replaces it (a projection) return another :class:`~drt_peft.layer.BaseDRTLayer` here.
        """
        return DRTLayer(module, indices, self.config.mode, self.config.bias == "all")

    def on_attach(self, model: Any, step: int = 0) -> None:
        """Called when the ``DRTModel`` is built or loaded (``step`` 0) and when training resumes at ``step``."""

    def on_step(self, model: Any, step: int, optimizer: Any) -> dict[str, float]:
        """The method's per-step policy, run by ``DRTModel.update_masks`` after each optimizer step.

        Static methods do nothing; dynamic ones change ψ, FreezeNet decays its frozen entries.
        Returns values worth logging.
        """
        return {}

    def statistics(self, model: Any) -> dict[str, float]:
        """Values of the method's state worth reporting in ``DRTModel.drt_statistics`` (none here)."""
        return {}

    def _load_from_state_dict(self, state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
        """A checkpoint may hold state the policy creates only during training (a buffer registered at some step):
        such buffers are registered here, so that resuming restores them rather than dropping them."""
        for key, value in state_dict.items():
            name = key[len(prefix) :]
            if (
                key.startswith(prefix)
                and "." not in name
                and name not in self._buffers
                and name not in self._parameters
            ):
                self.register_buffer(name, torch.empty_like(value))
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return type(self.config).__name__
