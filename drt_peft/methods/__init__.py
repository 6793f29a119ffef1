"""One short file per method: a registered config naming its criterion (and, for methods with a
per-step policy, its ``on_step``)."""

from .dsr import DSRConfig
from .fish import FISHConfig
from .force import FORCEConfig
from .freezenet import FreezeNetConfig
from .grasp import GraSPAbsConfig, GraSPConfig
from .lubana_dick import LubanaDickConfig
from .magnitude import MagnitudeConfig
from .random import RandomConfig
from .rigl import RigLConfig
from .set import SETConfig
from .snfs import SNFSConfig
from .snip import SNIPConfig
from .synflow import SynFlowConfig

__all__ = [
    "DSRConfig",
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
    "SNFSConfig",
    "SNIPConfig",
    "SynFlowConfig",
]
