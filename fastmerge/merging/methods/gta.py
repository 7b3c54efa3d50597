"""mergekit's "generalised task arithmetic" in torch, operation for operation and in the
checkpoints' dtype: task vectors sparsified one by one (TIES' magnitude top-k, Model Breadcrumbs'
band that drops the largest `gamma` and the smallest entries; optionally rescaled to their L1
norm), weighted, a sign consensus or none, summed, normalised by the weights, scaled by lambda.

It backs Model Breadcrumbs (methods/breadcrumbs.py), mergekit's DARE variants (methods/dare_gta.py,
with fastmerge's own random draws) and TIES under --mergekit-compat; it keeps
every task vector of a tensor in memory (n x the tensor), as mergekit does. fastmerge's own TIES
is the fused kernel (ops.same_init.ties_merge)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...ops import selection
from ...ops.same_init import dare_draws, dare_keep, ties_threshold_count


def _magnitude(delta: torch.Tensor, density: float, gamma: float, compat: bool = True) -> torch.Tensor:
    """TIES' keep mask: the int(density * n) (at least 1) largest magnitudes, ties by torch's argsort."""
    keep = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    keep[torch.argsort(delta.abs().reshape(-1).float(), descending=True)[:ties_threshold_count(delta.numel(),
                                                                                              density)]] = 1
    return keep.reshape_as(delta)


def _band(delta: torch.Tensor, density: float, gamma: float, compat: bool = False) -> torch.Tensor:
    """Model Breadcrumbs' keep mask: int(density * n) entries, above the smallest magnitudes and
    below the int(gamma * n) largest (the outliers), as far as the density allows.

    Entries tied in magnitude at the band's edges: by position (a radix select, no sort), or with
    `compat` wherever torch's sort places them, as mergekit does (a full sort: 5-10x slower)."""
    n = delta.numel()
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    if not compat and selection.supports(delta.dtype):
        return selection.band_mask(delta, bottom, bottom + target).to(delta.dtype)
    keep = torch.zeros(n, dtype=delta.dtype, device=delta.device)
    keep[torch.sort(delta.abs().reshape(-1).float(), descending=False).indices[bottom:bottom + target]] = 1
    return keep.reshape_as(delta)


SPARSIFIERS = {"magnitude": _magnitude, "band": _band}


def _uniform(numel: int, seed: int, device) -> torch.Tensor:
    """fastmerge's hashed uniform draws in [0, 1) (float64), one per entry."""
    return dare_draws(seed, 0, numel, device).to(torch.float64) / (1 << 24)


def magnitude_keep(delta: torch.Tensor, density: float, epsilon: float, seed: int) -> torch.Tensor:
    """DELLA's keep mask (MagPrune): along each row, an entry's keep probability rises linearly
    with the rank of its magnitude from density - epsilon to density + epsilon; drawn with
    fastmerge's hashed draws (not torch's generator, so not mergekit's masks)."""
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    order = torch.argsort(rows.abs().float(), dim=1)  # its inverse permutation: the ranks (one sort, not two)
    ranks = torch.empty(order.shape, dtype=torch.float64, device=order.device)
    ranks.scatter_(1, order, torch.arange(order.shape[1], dtype=torch.float64, device=order.device).expand_as(order))
    width = rows.shape[1] - 1
    position = ranks / width if width > 0 else torch.zeros_like(ranks)  # ranks run 0..n-1 in every row
    probability = (density - epsilon) + position * 2 * epsilon
    keep = _uniform(rows.numel(), seed, delta.device).reshape(rows.shape) < probability
    return keep.to(delta.dtype).reshape_as(delta)


def random_keep(delta: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    """DARE's keep mask from fastmerge's hashed draws (reproducible; not torch's generator, so not
    mergekit's masks): an entry is kept with probability `density`."""
    return dare_keep(seed, 0, delta.numel(), density, delta.device).to(delta.dtype).reshape_as(delta)


def gta_as_mergekit(tensors: Sequence[torch.Tensor], base: torch.Tensor, weights: Sequence[float],
                    densities: Sequence[float], *, sparsify: str | None, consensus: bool, normalize: bool,
                    scale: float, gammas: Sequence[float] | None = None, rescale: bool = False,
                    seeds: Sequence[int] | None = None, epsilons: Sequence[float] | None = None,
                    compat: bool = False) -> torch.Tensor:
    """`sparsify`: "magnitude" (TIES), "band" (Breadcrumbs), "random" (DARE, with `seeds`),
    "della" (with `seeds` and `epsilons`) or None. `compat`: the band's ties as mergekit's sort
    places them (see _band); the magnitude top-k always sorts (only --mergekit-compat runs it)."""
    deltas = base.new_empty((len(tensors), *base.shape))
    for i, tensor in enumerate(tensors):
        delta = tensor.to(base.dtype) - base
        if sparsify is not None and densities[i] < 1.0 and delta.numel():
            if sparsify == "random":
                keep = random_keep(delta, densities[i], seeds[i])
            elif sparsify == "della":
                keep = magnitude_keep(delta, densities[i], epsilons[i], seeds[i])
            else:
                keep = SPARSIFIERS[sparsify](delta, densities[i], gammas[i] if gammas else 0.01, compat)
            masked = delta * keep
            if rescale:  # to the task vector's L1 norm (mergekit's rescale: RescaleNorm.l1)
                before, after = delta.abs().sum(), masked.abs().sum()
                masked = masked if before < 1e-7 or after < 1e-7 else masked * (before / after)
            delta = masked
        deltas[i] = delta
    w = torch.tensor(list(weights), dtype=deltas.dtype, device=deltas.device).reshape(-1, *([1] * base.dim()))
    deltas.mul_(w)
    if consensus:
        elected = (deltas.sum(dim=0) >= 0).to(base.dtype) * 2 - 1
        agree = (deltas.sign().to(base.dtype) == elected).to(base.dtype)  # once: both products promote it
        mixed = (deltas * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if scale != 1:
        mixed *= scale
    return (base + mixed).to(base.dtype)
