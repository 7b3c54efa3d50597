"""TIES: each task vector trimmed to its `density` largest magnitudes (a threshold per model from the
whole tensor, exact), a sign elected per entry, the agreeing entries averaged (fused op). With
`rescale` (mergekit's, for every sparsifying method) each trimmed task vector is scaled back to its
L1 norm, in mergekit's arithmetic (methods/gta.py)."""

import torch

from ...errors import NonFiniteError
from ...ops.same_init import ties_merge, ties_threshold_count, ties_thresholds
from .base import SameInitMethod, register, task_weights
from .gta import gta_as_mergekit


def merge_ties(name, tensors, base, options, out_dtype, out):
    n = len(tensors)
    numel = base.numel()
    densities = list(options.densities) if options.densities is not None else [options.density] * n
    if options.mergekit_compat or options.rescale:
        # mergekit's arithmetic (and its rescale: each trimmed task vector scaled back to its L1 norm) (task vectors in the inputs' dtype, exactly k kept by its sort):
        # fastmerge's TIES differs from it by more than rounding where magnitudes tie (half-precision
        # checkpoints, or float32 ones loaded from them)
        return gta_as_mergekit(tensors, base, task_weights(options, n), densities, sparsify="magnitude",
                               consensus=True, normalize=options.normalize is not False,
                               scale=options.scale, rescale=bool(options.rescale)).to(out_dtype)
    thresholds = [0.0] * n  # density 1: nothing trimmed
    for density in sorted(set(d for d in densities if d < 1.0)) if numel else ():  # a pass per distinct density
        members = [i for i, d in enumerate(densities) if d == density]
        found, nonfinite = ties_thresholds([tensors[i] for i in members], base, ties_threshold_count(numel, density))
        if any(nonfinite):  # (the pass that selects the thresholds also checks the inputs)
            m = members[next(j for j, c in enumerate(nonfinite) if c)]
            raise NonFiniteError(f"tensor {name!r}: {max(nonfinite)} entries of model {m}'s task vector (model - base) "
                                 "are NaN/Inf: a model or the base is broken there, or the difference overflows")
        for i, threshold in zip(members, found):
            thresholds[i] = threshold
    normalize = True if options.normalize is None else options.normalize
    return ties_merge(tensors, base, task_weights(options, n), thresholds, options.scale, out_dtype, out,
                      normalize=normalize)


def _checks_finite(options) -> bool:
    """The threshold pass counts NaN/Inf where it runs: when a density trims, and not in the
    mergekit-compatible path (which may run instead)."""
    trims = options.density < 1.0 if options.densities is None else any(d < 1.0 for d in options.densities)
    return trims and not (options.mergekit_compat or options.rescale)


def _mergekit_difference(options, dtype) -> str | None:
    if options.mergekit_compat or options.rescale or dtype not in (torch.bfloat16, torch.float16):
        return None
    return ("task vectors formed in float32, every entry tied with the smallest kept one kept (mergekit: in the "
            "checkpoints' dtype, exactly int(density * n) entries)")


register(SameInitMethod(name="ties", merge=merge_ties, needs_base=True, checks_finite=_checks_finite,
                        mergekit_difference=_mergekit_difference,
                        uses=("weights", "scale", "density", "densities", "normalize", "rescale", "mergekit_compat")))
