"""The engine's ops: typed wrappers over the compiled kernels, each with a pure-torch reference."""

from .. import _ext
from .assignment import linear_assignment, linear_assignment_reference
from .combine import combine, combine_reference
from .nonfinite import count_nonfinite, count_nonfinite_reference
from .same_init import abs_delta_kth_largest, dare_merge, ties_merge
from .sigmoid_merge import sigmoid_merge
from .covariance import CovarianceState, correlation_from_covariance, cov_update_reference, resolve_pairs
from .transform import AxisJob, transform_axes, transform_axes_reference

__all__ = [
    "AxisJob",
    "abs_delta_kth_largest",
    "CovarianceState",
    "combine",
    "combine_reference",
    "correlation_from_covariance",
    "count_nonfinite",
    "count_nonfinite_reference",
    "cov_update_reference",
    "dare_merge",
    "linear_assignment",
    "linear_assignment_reference",
    "resolve_pairs",
    "sigmoid_merge",
    "ties_merge",
    "transform_axes",
    "transform_axes_reference",
]


def _register_python_parts() -> None:
    # imported only once the library has loaded: register_autograd needs the compiled ops to exist
    from . import _registrations  # noqa: F401


_ext.after_load(_register_python_parts)
