"""Karcher mean: the models' (uniformly weighted) mean direction on the unit hypersphere, found by
Riemannian gradient steps from the normalised Euclidean mean (at most `max_iter`, until a step
is shorter than `tol`), then scaled by the models' mean norm.

Written to agree with mergekit 0.1.5's karcher to the bit (the same float operations in the same
order: float32 norms, unit tensors in the checkpoints' dtype, zero or tiny tensors left out of
the direction), so a config merged by both tools gives the same model."""

import torch

from .base import SameInitMethod, register


def _norm(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.linalg.vector_norm(x.to(dtype))


def _log_map_step(mean: torch.Tensor, directions, shares, tol: float) -> torch.Tensor:
    """The weighted sum of the log maps of `directions` at `mean` (the Riemannian gradient)."""
    step = torch.zeros_like(mean)
    for share, direction in zip(shares, directions):
        cos = torch.clamp(torch.dot(mean.flatten(), direction.flatten()), -1.0, 1.0)
        angle = torch.arccos(cos)
        if angle.item() >= tol:
            step += share * (angle / torch.sin(angle)) * (direction - cos * mean)
    return step


def karcher_tensor(tensors, alphas, max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0]
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = [_norm(x, dtype) for x in tensors]
    directions = [torch.zeros_like(x) if n.item() == 0.0 else (x / n).to(x.dtype) for x, n in zip(tensors, norms)]
    used = [k for k, n in enumerate(norms) if n.item() > tol]
    if not used:  # every tensor (nearly) zero
        return sum(x * 0 for x in tensors)
    total = sum(alphas[k] for k in used)
    shares = [alphas[k] / total for k in used]
    directions = [directions[k] for k in used]

    mean = torch.zeros_like(directions[0])
    for share, direction in zip(shares, directions):
        mean += share * direction
    length = _norm(mean, dtype)
    mean = directions[0].clone() if length.item() < tol else (mean / length).to(mean.dtype)
    for _ in range(max_iter):
        step = _log_map_step(mean, directions, shares, tol)
        step_length = _norm(step, dtype)
        if step_length.item() < tol:
            break
        mean = (torch.cos(step_length) * mean + torch.sin(step_length) * (step / step_length)).to(mean.dtype)
        length = _norm(mean, dtype)
        if length.item() > tol:
            mean = (mean / length).to(mean.dtype)
    return sum(alpha * n for alpha, n in zip(alphas, norms)) * mean


def merge_karcher(name, tensors, base, options, out_dtype, out):
    alphas = [1.0 / len(tensors)] * len(tensors)
    return karcher_tensor(list(tensors), alphas, options.max_iter, options.tol).to(out_dtype)


register(SameInitMethod(name="karcher", merge=merge_karcher, min_models=1, uses=("max_iter", "tol")))
