"""The DRT embedding layer and its compact products."""

from .base import BaseDRTLayer
from .layer import DRTLayer
from .ops import SUPPORTED_TYPES, WeightOp, register_weight_op, weight_op

__all__ = ["SUPPORTED_TYPES", "BaseDRTLayer", "DRTLayer", "WeightOp", "register_weight_op", "weight_op"]
