"""drt_peft: Dimensionality Reduced Training for Hugging Face models.

Train d << D entries of a model's weights, Θ = ψ·ϑ + χ·Θ(0), with the methods of the survey
by Wimmer, Mehnert and Condurache behind one PEFT-style API.
"""

from . import logging as logging  # progress bar switches and the verbose helper: drt_peft.logging
from . import methods
from .checkpoint.sparse_model import load_sparse_model, save_sparse_model
from .config import DRTConfig, available_methods
from .layer import DRTLayer
from .lottery import find_lottery_ticket
from .methods import *  # noqa: F403  (every method's config; the one list of them is drt_peft.methods.__all__)
from .model import DRTModel, get_drt_model
from .trainer import DRTCallback, DRTTrainer

__version__ = "0.1.0"

__all__ = [
    "DRTCallback",
    "DRTConfig",
    "DRTLayer",
    "DRTModel",
    "DRTTrainer",
    "available_methods",
    "find_lottery_ticket",
    "get_drt_model",
    "load_sparse_model",
    "save_sparse_model",
    *methods.__all__,
]
