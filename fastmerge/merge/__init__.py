"""Merging: apply alignments, combine weights, repair statistics."""

from .api import MERGE_METHODS, check_same_architecture, combine_states, merge
from .repair import repair, reset_batch_norm

__all__ = ["MERGE_METHODS", "check_same_architecture", "combine_states", "merge", "repair", "reset_batch_norm"]
