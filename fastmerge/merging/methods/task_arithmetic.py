"""Task arithmetic: base + scale * sum_k w_k (W_k - base), one fused combination."""

from ...ops import combine
from .base import SameInitMethod, combine_target, register, task_weights


def merge_task_arithmetic(name, tensors, base, options, out_dtype, out):
    weights = task_weights(options, len(tensors))
    if options.normalize:  # mergekit's normalize: the weights divided by their sum (a sum near 0: by 1)
        total = sum(weights)
        weights = [w / total for w in weights] if abs(total) >= 1e-8 else weights
    coefs = [1.0 - options.scale * sum(weights)] + [options.scale * w for w in weights]
    return combine([[base]] + [[t] for t in tensors], weights=coefs,
                   out=combine_target(out, out_dtype, tensors))[0].to(out_dtype)


register(SameInitMethod(name="task_arithmetic", merge=merge_task_arithmetic, needs_base=True,
                        uses=("weights", "scale", "normalize")))
