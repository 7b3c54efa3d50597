"""Linear: the weighted average of the models (default weights uniform 1/n), one fused combination."""

from ...ops import combine
from .base import SameInitMethod, combine_target, register


def merge_linear(name, tensors, base, options, out_dtype, out):
    n = len(tensors)
    weights = list(options.weights) if options.weights is not None else [1.0 / n] * n
    return combine([[t] for t in tensors], weights=weights, out=combine_target(out, out_dtype, tensors))[0].to(out_dtype)


register(SameInitMethod(name="linear", merge=merge_linear, min_models=1))  # one: mergekit scales it (a copy when normalised)
