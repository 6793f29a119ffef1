"""One short file per method: a registered config naming its criterion (and, for methods with a
per-step policy, its ``on_step``)."""

from ..composition import ComposedConfig
from .dct_sparse import DCTSparseConfig
from .deep_r import DeepRConfig
from .dsr import DSRConfig
from .fish import FISHConfig
from .fixed_classifier import FixedClassifierConfig
from .force import FORCEConfig
from .freezenet import FreezeNetConfig
from .grasp import GraSPAbsConfig, GraSPConfig
from .intrinsic_dimension import IntrinsicDimensionConfig
from .lottery_ticket import LotteryTicketConfig
from .lubana_dick import LubanaDickConfig
from .magnitude import MagnitudeConfig
from .norm_bias import NormBiasConfig
from .prune_or_freeze import PruneOrFreezeConfig
from .random_mask import RandomConfig
from .rigl import RigLConfig
from .snfs import SNFSConfig
from .snip import SNIPConfig
from .sparse_evolutionary import SETConfig
from .spiel import SpIELConfig
from .supermask import SupermaskConfig
from .synflow import SynFlowConfig

__all__ = [
    "ComposedConfig",
    "DCTSparseConfig",
    "DSRConfig",
    "DeepRConfig",
    "FISHConfig",
    "FORCEConfig",
    "FixedClassifierConfig",
    "FreezeNetConfig",
    "GraSPAbsConfig",
    "GraSPConfig",
    "IntrinsicDimensionConfig",
    "LotteryTicketConfig",
    "LubanaDickConfig",
    "MagnitudeConfig",
    "NormBiasConfig",
    "PruneOrFreezeConfig",
    "RandomConfig",
    "RigLConfig",
    "SETConfig",
    "SNFSConfig",
    "SNIPConfig",
    "SpIELConfig",
    "SupermaskConfig",
    "SynFlowConfig",
]
