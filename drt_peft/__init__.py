"""drt_peft: Dimensionality Reduced Training for Hugging Face models.

Train d << D entries of a model's weights, Θ = ψ·ϑ + χ·Θ(0), with the methods of the survey
by Wimmer, Mehnert and Condurache behind one PEFT-style API.
"""

from .config import DRTConfig, available_methods
from .layer import DRTLayer
from .methods import (
    DSRConfig,
    FISHConfig,
    FORCEConfig,
    FreezeNetConfig,
    GraSPAbsConfig,
    GraSPConfig,
    LubanaDickConfig,
    MagnitudeConfig,
    RandomConfig,
    RigLConfig,
    SETConfig,
    SNFSConfig,
    SNIPConfig,
    SynFlowConfig,
)
from .model import DRTModel, get_drt_model
from .trainer import DRTCallback, DRTTrainer

__version__ = "0.1.0"

__all__ = [
    "DRTCallback",
    "DRTConfig",
    "DRTLayer",
    "DRTModel",
    "DRTTrainer",
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
    "available_methods",
    "get_drt_model",
]
