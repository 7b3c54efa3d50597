"""Alignment: per group and model, the transform that moves a model's units into a shared basis."""

from .activation import cca_transform, match_permutation, zipit_matrices
from .api import METHODS, Alignment, align
from .weight_matching import match_to, weight_matching

__all__ = ["METHODS", "Alignment", "align", "cca_transform", "match_permutation", "match_to", "weight_matching",
           "zipit_matrices"]
