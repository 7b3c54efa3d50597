"""TIES: each task vector trimmed to its `density` largest magnitudes (a threshold per model from the
whole tensor, exact), a sign elected per entry, the agreeing entries averaged (fused op)."""

from ...errors import NonFiniteError
from ...ops.same_init import ties_merge, ties_threshold_count, ties_thresholds
from .base import SameInitMethod, register, task_weights


def merge_ties(name, tensors, base, options, out_dtype, out):
    n = len(tensors)
    numel = base.numel()
    k = ties_threshold_count(numel, options.density)
    if options.density < 1.0 and numel:
        thresholds, nonfinite = ties_thresholds(tensors, base, k)
        if any(nonfinite):  # (the pass that selects the thresholds also checks the inputs)
            m = next(i for i, c in enumerate(nonfinite) if c)
            raise NonFiniteError(f"tensor {name!r}: {nonfinite[m]} entries of model {m}'s task vector (model - base) "
                                 "are NaN/Inf: a model or the base is broken there, or the difference overflows")
    else:
        thresholds = [0.0] * n
    return ties_merge(tensors, base, task_weights(options, n), thresholds, options.scale, out_dtype, out)


register(SameInitMethod(name="ties", merge=merge_ties, needs_base=True,
                        checks_finite=lambda options: options.density < 1.0, uses=("weights", "scale", "density")))
