"""Merging: apply alignments, combine weights, repair statistics."""

from ..checks import check_same_architecture
from .api import MERGE_METHODS, combine_states, merge
from .np_merge import NPMergeResult, np_merge
from .repair import repair, reset_batch_norm

__all__ = ["MERGE_METHODS", "NPMergeResult", "check_same_architecture", "combine_states", "merge", "np_merge",
           "repair", "reset_batch_norm"]
