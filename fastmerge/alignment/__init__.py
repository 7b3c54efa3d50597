"""Alignment: per group and model, the transform that moves a model's units into a shared basis."""

from .activation import cca_transform, match_permutation, zipit_matrices
from .api import Alignment, align
from .methods import METHODS, AlignmentMethod, get_method, register
from .weight_matching import match_to, weight_matching

__all__ = ["METHODS", "Alignment", "AlignmentMethod", "align", "cca_transform", "get_method", "match_permutation",
           "match_to", "register", "weight_matching", "zipit_matrices"]
