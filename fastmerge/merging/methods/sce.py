"""SCE (Wan et al. 2024): Select the entries where the task vectors vary most (a `select_topk`
fraction of those that vary at all), Calculate each model's weight from its task vector's mean
square, Erase the entries whose sign disagrees with the summed task vectors', and take the
weighted mean of what is left.

Written to agree with mergekit 0.1.5's sce to the bit (the same float operations in the same
order, in the checkpoints' dtype, torch's topk included: choosing among tied variances by position
changed whole bfloat16 models enough to change their greedy tokens;
tests/io/test_mergekit_conformance.py). The variance, which torch computes entry by entry, is the
same arithmetic vectorised."""

import torch

from ...io.reader import release_pages
from .base import SameInitMethod, register


VARIANCE_CHUNK = 1 << 16  # entries per step of population_variance: its float64 temporaries stay in cache


def population_variance(stacked: torch.Tensor) -> torch.Tensor:
    """torch.var(stacked, dim=0, unbiased=False), the same bits, about 25x faster: torch reduces
    each entry on its own (Welford's update in float64, model by model, the result rounded to the
    dtype through float32); the same updates run here on chunks of entries, every model at once."""
    flat = stacked.reshape(stacked.shape[0], -1)
    out = torch.empty(flat.shape[1], dtype=stacked.dtype, device=stacked.device)
    for start in range(0, flat.shape[1], VARIANCE_CHUNK):
        chunk = flat[:, start:start + VARIANCE_CHUNK].to(torch.float64)
        mean = chunk[0] + 0.0  # torch's first update from 0 (+ 0.0 turns -0.0 into 0.0, as it does)
        m2 = chunk[0] * (chunk[0] - mean) + 0.0  # zeros; NaN where the first model is not finite
        for i in range(1, chunk.shape[0]):
            delta = chunk[i] - mean
            mean += delta / (i + 1)
            m2 += delta * (chunk[i] - mean)
        m2 /= flat.shape[0]
        out[start:start + VARIANCE_CHUNK] = m2 if stacked.dtype == torch.float64 else m2.to(torch.float32)
    return out.reshape(stacked.shape[1:])


def _varying_entries(task_vectors: torch.Tensor, fraction: float) -> torch.Tensor:
    """1 at the `fraction` (< 1) of entries (of those that vary at all) whose variance across models
    is largest."""
    if fraction <= 0:
        return torch.zeros_like(task_vectors[0])
    variance = population_variance(task_vectors)
    count = int(torch.count_nonzero(variance) * fraction)
    keep = torch.zeros_like(variance)
    if count:
        # unsorted: torch selects the same entries (sorting only orders them afterwards), 2x faster
        keep.view(-1)[torch.topk(variance.abs().view(-1), k=count, largest=True, sorted=False).indices] = 1
    return keep


def _energy_shares(task_vectors: torch.Tensor) -> torch.Tensor:
    """Each model's share of the task vectors' mean squares (uniform when they are all about 0).
    Over the whole stack at once: the float32 means of single rows are reduced in another order."""
    energy = task_vectors.square().reshape(task_vectors.shape[0], -1).mean(dim=1)
    total = torch.sum(energy).item()
    return torch.ones_like(energy) / energy.shape[0] if abs(total) < 1e-6 else energy / total


CHUNK = 1 << 20  # entries per step of the sign election and the weighted mean


def merge_sce(name, tensors, base, options, out_dtype, out):
    task_vectors = base.new_empty((len(tensors), *base.shape))
    for i, tensor in enumerate(tensors):
        torch.sub(tensor, base, out=task_vectors[i])
        release_pages(tensor)  # its map's pages: the task vector holds what is needed of it
    if options.select_topk < 1:
        task_vectors.mul_(_varying_entries(task_vectors, options.select_topk))
    shares = _energy_shares(task_vectors).reshape(-1, 1)
    flat, base_flat = task_vectors.reshape(len(tensors), -1), base.reshape(-1)
    merged = torch.empty_like(base_flat)
    # the rest is per entry over the models (dimension 0): column ranges give the same values
    for begin in range(0, base_flat.numel(), CHUNK):
        chunk = flat[:, begin:begin + CHUNK]
        majority = (chunk.sum(dim=0) >= 0).to(base.dtype) * 2 - 1  # a zero sum counts as positive
        kept = shares * (chunk.sign().to(base.dtype) == majority)
        mean = (chunk * kept).sum(dim=0) / torch.sum(kept, dim=0).clamp(min=1e-6)
        torch.add(base_flat[begin:begin + CHUNK], mean, out=merged[begin:begin + CHUNK])
    return merged.reshape(base.shape).to(out_dtype)


register(SameInitMethod(name="sce", merge=merge_sce, needs_base=True, min_models=1, uses=("select_topk",)))
