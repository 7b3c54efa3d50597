"""Alignment: per group and model, the transform that moves a model's units into a shared basis.

The weight matching algorithm is fastmerge.alignment.weight_matching.weight_matching (not
re-exported here, where it would hide its module).
"""

from .activation import cca_transform, match_permutation, zipit_matrices
from .api import Alignment, align
from .methods import METHODS, AlignmentMethod, get_method, register
from .weight_matching import match_to

__all__ = ["METHODS", "Alignment", "AlignmentMethod", "align", "cca_transform", "get_method", "match_permutation",
           "match_to", "register", "zipit_matrices"]
