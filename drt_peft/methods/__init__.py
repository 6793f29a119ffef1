"""One short file per method: a registered config naming its criterion (and, for methods with a
per-step policy, its ``on_step``)."""

from .fish import FISHConfig
from .force import FORCEConfig
from .freezenet import FreezeNetConfig
from .grasp import GraSPAbsConfig, GraSPConfig
from .lubana_dick import LubanaDickConfig
from .magnitude import MagnitudeConfig
from .random import RandomConfig
from .rigl import RigLConfig
from .set import SETConfig
from .snip import SNIPConfig
from .synflow import SynFlowConfig

__all__ = [
    "FISHConfig",
    "FORCEConfig",
    "FreezeNetConfig",
    "GraSPAbsConfig",
    "GraSPConfig",
    "LubanaDickConfig",
    "MagnitudeConfig",
    "RandomConfig",
    "RigLConfig",
    "SETConfig",
    "SNIPConfig",
    "SynFlowConfig",
]
