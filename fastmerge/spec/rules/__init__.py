"""Op rules for the tracer, one module per op family; importing this package registers them all."""

from . import conv, elementwise, indexing, linear, norm, reduction, shape
from .base import HANDLERS, IGNORED, handles

__all__ = ["HANDLERS", "IGNORED", "conv", "elementwise", "handles", "indexing", "linear", "norm", "reduction",
           "shape"]
