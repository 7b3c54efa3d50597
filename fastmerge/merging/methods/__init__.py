"""The same-initialisation merge methods, one module each; importing them registers them (in this
order, which is the order of the CLI's choices)."""

from . import (  # noqa: F401  (registration)
    linear, task_arithmetic, ties, dare, slerp, model_stock, breadcrumbs, nuslerp, multislerp, nearswap,
    karcher, sce, dare_gta, arcee_fusion, ram,
)
from .base import METHODS, SameInitMethod, get_method, register

__all__ = ["METHODS", "SameInitMethod", "get_method", "register"]
