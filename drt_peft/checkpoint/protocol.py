"""What reading and writing adapters needs from a model, so that ``checkpoint/`` never depends on ``DRTModel``."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..base_weights import BaseProbe
    from ..config import DRTConfig
    from ..layer import BaseDRTLayer


class AdapterModel(Protocol):
    """What reading and writing checkpoints needs from a model; :class:`~drt_peft.DRTModel` is one."""

    drt_config: DRTConfig
    base_probe: BaseProbe

    @property
    def modules_to_save(self) -> list[str]: ...

    def get_base_model(self) -> nn.Module: ...

    def drt_layers(self) -> Iterator[tuple[str, BaseDRTLayer]]: ...

    def training_state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> Any: ...
