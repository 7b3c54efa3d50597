"""Merging: apply alignments, combine weights, repair statistics; the same-init methods' registry.

The functions np_merge and repair are not re-exported here: they would hide their modules of the
same names (fastmerge.merging.np_merge, fastmerge.merging.repair); fastmerge.np_merge is the
function, and so is fastmerge.merging.np_merge.np_merge.
"""

from ..checks import check_same_architecture
from .api import MERGE_METHODS, combine_states, merge, merge_methods
from .methods import METHODS, SameInitMethod
from .np_merge import NPMergeResult
from .repair import reset_batch_norm

__all__ = ["MERGE_METHODS", "METHODS", "NPMergeResult", "SameInitMethod", "check_same_architecture", "combine_states",
           "merge", "merge_methods", "reset_batch_norm"]
