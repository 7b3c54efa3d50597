"""fastmerge: align and merge neural networks on a C++/CUDA engine.

The compiled engine loads lazily, on the first op call, so importing fastmerge stays cheap and
works even when the library is missing (ops then fall back to pure-torch references).
"""

from . import errors, ops
from ._version import __version__
from .ops import AxisJob, CovarianceState, combine, linear_assignment, transform_axes

__all__ = [
    "AxisJob",
    "CovarianceState",
    "__version__",
    "combine",
    "errors",
    "linear_assignment",
    "ops",
    "transform_axes",
]
