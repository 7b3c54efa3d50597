"""Merging: apply alignments, combine weights, repair statistics; the same-init methods' registry."""

from ..checks import check_same_architecture
from .api import MERGE_METHODS, combine_states, merge, merge_methods
from .methods import METHODS, SameInitMethod
from .np_merge import NPMergeResult, np_merge
from .repair import repair, reset_batch_norm

__all__ = ["MERGE_METHODS", "METHODS", "NPMergeResult", "SameInitMethod", "check_same_architecture", "combine_states",
           "merge", "merge_methods", "np_merge", "repair", "reset_batch_norm"]
