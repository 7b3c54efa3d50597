"""mergekit's "generalised task arithmetic" in torch, operation for operation and in the
checkpoints' dtype: task vectors sparsified one by one (TIES' magnitude top-k, Model Breadcrumbs'
band that drops the largest `gamma` and the smallest entries; optionally rescaled to their L1
norm), weighted, a sign consensus or none, summed, normalised by the weights, scaled by lambda.

It backs Model Breadcrumbs (methods/breadcrumbs.py), mergekit's DARE variants (methods/dare_gta.py,
with fastmerge's own random draws) and TIES under --mergekit-compat; it keeps
every task vector of a tensor in memory (n x the tensor), as mergekit does, sparsified in place; the
sign consensus and the sums run over ranges of entries. fastmerge's own TIES
is the fused kernel (ops.same_init.ties_merge)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ... import _ext
from ...io.reader import release_pages
from ...ops import selection
from ...ops.same_init import dare_draws, dare_keep, ties_threshold_count

CONSENSUS_CHUNK = 1 << 20  # entries per step of the sign consensus and the sums over the models


def _magnitude(delta: torch.Tensor, density: float, gamma: float, compat: bool = True) -> torch.Tensor:
    """TIES' keep mask: the int(density * n) (at least 1) largest magnitudes, ties by torch's argsort."""
    keep = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
    keep[torch.argsort(delta.abs().reshape(-1).float(), descending=True)[:ties_threshold_count(delta.numel(),
                                                                                              density)]] = True
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
        return selection.band_mask(delta, bottom, bottom + target)
    keep = torch.zeros(n, dtype=torch.bool, device=delta.device)
    keep[torch.sort(delta.abs().reshape(-1).float(), descending=False).indices[bottom:bottom + target]] = True
    return keep.reshape_as(delta)


SPARSIFIERS = {"magnitude": _magnitude, "band": _band}


def _uniform(numel: int, seed: int, device) -> torch.Tensor:
    """fastmerge's hashed uniform draws in [0, 1) (float64), one per entry."""
    return dare_draws(seed, 0, numel, device).to(torch.float64) / (1 << 24)


def magnitude_keep(delta: torch.Tensor, density: float, epsilon: float, seed: int) -> torch.Tensor:
    """DELLA's keep mask (MagPrune): along each row, an entry's keep probability rises linearly
    with the rank of its magnitude from density - epsilon to density + epsilon (equal magnitudes
    rank by position); drawn with fastmerge's hashed draws (not torch's generator, so not
    mergekit's masks). Compiled for CPU tensors of up to two dimensions (a radix sort per row, the
    same mask): magnitude_keep_reference elsewhere."""
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    if rows.dim() == 2 and rows.device.type == "cpu" and selection.supports(rows.dtype) and _ext.load():
        keep = torch.empty(rows.shape, dtype=torch.bool)
        torch.ops.fastmerge.magprune_keep_out(rows.contiguous(), density, epsilon, seed, keep)
        return keep.reshape_as(delta)
    return magnitude_keep_reference(delta, density, epsilon, seed)


def magnitude_keep_reference(delta: torch.Tensor, density: float, epsilon: float, seed: int) -> torch.Tensor:
    """magnitude_keep in torch ops: the ranks from a stable argsort along dimension 1."""
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    order = torch.argsort(rows.abs().float(), dim=1, stable=True)  # its inverse permutation: the ranks
    ranks = torch.empty(order.shape, dtype=torch.float64, device=order.device)
    positions = torch.arange(order.shape[1], dtype=torch.float64, device=order.device)
    ranks.scatter_(1, order, positions.reshape(1, -1, *([1] * (order.dim() - 2))).expand_as(order))
    width = rows.shape[1] - 1
    position = ranks / width if width > 0 else torch.zeros_like(ranks)  # ranks run 0..n-1 in every row
    probability = (density - epsilon) + position * 2 * epsilon
    return (_uniform(rows.numel(), seed, delta.device).reshape(rows.shape) < probability).reshape_as(delta)


def random_keep(delta: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    """DARE's keep mask from fastmerge's hashed draws (reproducible; not torch's generator, so not
    mergekit's masks): an entry is kept with probability `density`."""
    return dare_keep(seed, 0, delta.numel(), density, delta.device).reshape_as(delta)


def gta_as_mergekit(tensors: Sequence[torch.Tensor], base: torch.Tensor, weights: Sequence[float],
                    densities: Sequence[float], *, sparsify: str | None, consensus: bool, normalize: bool,
                    scale: float, gammas: Sequence[float] | None = None, rescale: bool = False,
                    seeds: Sequence[int] | None = None, epsilons: Sequence[float] | None = None,
                    compat: bool = False) -> torch.Tensor:
    """`sparsify`: "magnitude" (TIES), "band" (Breadcrumbs), "random" (DARE, with `seeds`),
    "della" (with `seeds` and `epsilons`) or None. `compat`: the band's ties as mergekit's sort
    places them (see _band); the magnitude top-k always sorts (only --mergekit-compat runs it)."""
    deltas = base.new_empty((len(tensors), *base.shape))
    for i, tensor in enumerate(tensors):  # each task vector sparsified in place: temporaries of one tensor
        delta = torch.sub(tensor.to(base.dtype), base, out=deltas[i])
        release_pages(tensor)  # its map's pages: the task vector holds what is needed of it
        if sparsify is not None and densities[i] < 1.0 and delta.numel():
            if sparsify == "random":
                keep = random_keep(delta, densities[i], seeds[i])
            elif sparsify == "della":
                keep = magnitude_keep(delta, densities[i], epsilons[i], seeds[i])
            else:
                keep = SPARSIFIERS[sparsify](delta, densities[i], gammas[i] if gammas else 0.01, compat)
            before = delta.abs().sum() if rescale else None
            delta.mul_(keep)
            del keep
            if rescale:  # to the task vector's L1 norm (mergekit's rescale: RescaleNorm.l1)
                after = delta.abs().sum()
                if not (before < 1e-7 or after < 1e-7):
                    delta.mul_(before / after)
    w = torch.tensor(list(weights), dtype=deltas.dtype, device=deltas.device).reshape(-1, 1)
    flat = deltas.reshape(len(tensors), -1)
    flat.mul_(w)
    if not consensus:
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    base_flat = base.reshape(-1)
    merged = torch.empty_like(base_flat)
    # The rest is per entry (the consensus and the sums run over the models, dimension 0), so it
    # runs over column ranges: the same values as whole tensors, with temporaries of a few n x chunk
    for begin in range(0, base_flat.numel(), CONSENSUS_CHUNK):
        end = min(base_flat.numel(), begin + CONSENSUS_CHUNK)
        chunk = flat[:, begin:end]
        if consensus:
            elected = (chunk.sum(dim=0) >= 0).to(base.dtype) * 2 - 1
            agree = (chunk.sign() == elected).to(base.dtype)  # once: both products promote it
            mixed = (chunk * agree).sum(dim=0)
            divisor = (w * agree).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            mixed = chunk.sum(dim=0)
        if normalize:
            mixed /= divisor
        if scale != 1:
            mixed *= scale
        torch.add(base_flat[begin:end], mixed, out=merged[begin:end])
    return merged.reshape(base.shape)
