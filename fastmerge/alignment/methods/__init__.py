"""The alignment methods, one module each; importing them registers them (in this order, which is
the order of tables and CLI choices)."""

from . import permute, weight_matching, zipit, cca  # noqa: F401  (registration)
from .base import (METHODS, AlignmentMethod, NoOptions, WeightMatchingOptions, dense_blockers, dense_ok, get_method,
                   register)

__all__ = ["METHODS", "AlignmentMethod", "NoOptions", "WeightMatchingOptions", "dense_blockers", "dense_ok", "get_method", "register"]
