"""drt_peft: Dimensionality Reduced Training for Hugging Face models.

Train d << D entries of a model's weights, Θ = ψ·ϑ + χ·Θ(0), with the methods of the survey
by Wimmer, Mehnert and Condurache behind one PEFT-style API.
"""

from .config import DRTConfig, available_methods
from .layer import DRTLayer
from .lottery import find_lottery_ticket
from .methods import (
    DCTSparseConfig,
    DSRConfig,
    FISHConfig,
    FixedClassifierConfig,
    FORCEConfig,
    FreezeNetConfig,
    GraSPAbsConfig,
    GraSPConfig,
    IntrinsicDimensionConfig,
    LotteryTicketConfig,
    LubanaDickConfig,
    MagnitudeConfig,
    NormBiasConfig,
    PruneOrFreezeConfig,
    RandomConfig,
    RigLConfig,
    SETConfig,
    SNFSConfig,
    SNIPConfig,
    SupermaskConfig,
    SynFlowConfig,
)
from .model import DRTModel, get_drt_model
from .trainer import DRTCallback, DRTTrainer

__version__ = "0.1.0"

__all__ = [
    "DCTSparseConfig",
    "DRTCallback",
    "DRTConfig",
    "DRTLayer",
    "DRTModel",
    "DRTTrainer",
    "DSRConfig",
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
    "SupermaskConfig",
    "SynFlowConfig",
    "available_methods",
    "find_lottery_ticket",
    "get_drt_model",
]
