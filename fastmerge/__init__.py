"""fastmerge: align and merge neural networks on a C++/CUDA engine.

The compiled engine loads lazily, on the first op call, so importing fastmerge stays cheap and
works even when the library is missing (ops then fall back to pure-torch references).
"""

from . import errors, ops, spec
from ._version import __version__
from .alignment import Alignment, align
from .merging import merge
from .merging.np_merge import np_merge
from .ops import AxisJob, CovarianceState, combine, linear_assignment, transform_axes
from .spec import MergeSpec, check_spec, trace_spec
from .stats import StatsCollector, collect_stats

__all__ = [
    "Alignment",
    "AxisJob",
    "CovarianceState",
    "MergeSpec",
    "StatsCollector",
    "align",
    "__version__",
    "check_spec",
    "collect_stats",
    "combine",
    "errors",
    "linear_assignment",
    "merge",
    "np_merge",
    "ops",
    "spec",
    "trace_spec",
    "transform_axes",
]
