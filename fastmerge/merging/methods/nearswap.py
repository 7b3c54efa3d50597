"""NearSwap: the base, with each entry moved toward the other model by t / |base - other| (at most
all the way): entries where the two are within t become the other's, far-apart ones stay near
the base. mergekit 0.1.5's arithmetic, in the checkpoints' dtype, to the bit."""

import torch

from .base import SameInitMethod, register


def merge_nearswap(name, tensors, base, options, out_dtype, out):
    a, b = base, tensors[0]
    weight = (options.t / torch.abs(a - b).clamp(min=1e-6)).clamp(min=0, max=1)
    return (weight * b + (1 - weight) * a).to(out_dtype)


register(SameInitMethod(name="nearswap", merge=merge_nearswap, needs_base=True, min_models=1, max_models=1,
                        uses=("t",)))
