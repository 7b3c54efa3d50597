"""SCE (Wan et al. 2024): Select the entries where the task vectors vary most (a `select_topk`
fraction of those that vary at all), Calculate each model's weight from its task vector's mean
square, Erase the entries whose sign disagrees with the summed task vectors', and take the
weighted mean of what is left.

Written to agree with mergekit 0.1.5's sce to the bit (the same float operations in the same
order, in the checkpoints' dtype; tests/io/test_mergekit_conformance.py)."""

import torch

from .base import SameInitMethod, register


def _varying_entries(task_vectors: torch.Tensor, fraction: float) -> torch.Tensor:
    """1 at the `fraction` of entries (of those that vary at all) whose variance across models is largest."""
    if fraction <= 0:
        return torch.zeros_like(task_vectors[0])
    if fraction >= 1:
        return torch.ones_like(task_vectors[0])
    variance = torch.var(task_vectors, dim=0, unbiased=False)
    count = int(torch.count_nonzero(variance) * fraction)
    keep = torch.zeros_like(variance)
    if count:
        keep.view(-1)[torch.topk(variance.abs().view(-1), k=count, largest=True).indices] = 1
    return keep


def _energy_shares(task_vectors: torch.Tensor) -> torch.Tensor:
    """Each model's share of the task vectors' mean squares (uniform when they are all about 0)."""
    energy = task_vectors.square().reshape(task_vectors.shape[0], -1).mean(dim=1)
    total = torch.sum(energy).item()
    return torch.ones_like(energy) / energy.shape[0] if abs(total) < 1e-6 else energy / total


def merge_sce(name, tensors, base, options, out_dtype, out):
    task_vectors = torch.stack([x - base for x in tensors], dim=0)
    if options.select_topk < 1:
        task_vectors = task_vectors * _varying_entries(task_vectors, options.select_topk).unsqueeze(0)
    majority = (task_vectors.sum(dim=0) >= 0).to(base.dtype) * 2 - 1  # a zero sum counts as positive
    agrees = task_vectors.sign().to(base.dtype) == majority
    shares = _energy_shares(task_vectors)
    shares = shares.view(-1, *([1] * (task_vectors.dim() - 1)))
    kept = shares * agrees
    merged = (task_vectors * kept).sum(dim=0) / torch.sum(kept, dim=0).clamp(min=1e-6)
    return (base + merged).to(out_dtype)


register(SameInitMethod(name="sce", merge=merge_sce, needs_base=True, min_models=1, uses=("select_topk",)))
