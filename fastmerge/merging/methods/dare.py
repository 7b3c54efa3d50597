"""DARE: each task vector's entries kept at random with probability `density` and rescaled by
1/density (masks seeded per model and tensor name: reruns are bit-identical), then added (fused op)."""

import zlib

from ...ops.same_init import dare_merge
from .base import SameInitMethod, register, task_weights


def mask_seed(seed: int, model: int, name: str) -> int:
    """The seed of model `model`'s random draws for tensor `name` (the run's seed mixed in)."""
    return (seed * 1_000_003 + model * 7919 + zlib.crc32(name.encode())) % (2**63)


def merge_dare(name, tensors, base, options, out_dtype, out):
    n = len(tensors)
    coefs = [options.scale * w / options.density for w in task_weights(options, n)]
    seeds = [mask_seed(options.seed, k, name) for k in range(n)]
    return dare_merge(tensors, base, coefs, seeds, options.density, out_dtype, out)


register(SameInitMethod(name="dare", merge=merge_dare, needs_base=True, uses=("weights", "scale", "density", "seed")))
