"""The DRT embedding layer and its compact products."""

from .layer import DRTLayer
from .ops import SUPPORTED_TYPES, WeightOp, weight_op

__all__ = ["SUPPORTED_TYPES", "DRTLayer", "WeightOp", "weight_op"]
