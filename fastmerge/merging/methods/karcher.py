"""Karcher mean: the models' (uniformly weighted) mean direction on the unit hypersphere, found by
Riemannian gradient steps from the normalised Euclidean mean (at most `max_iter`, until a step
is shorter than `tol`), then scaled by the models' mean norm.

Every iterate is a combination of the unit tensors, so the iteration runs on their k x k Gram
matrix in float64 (the cosines and norms it needs are quadratic forms in it) and one fused pass
writes the result (methods/span.py): exact arithmetic where mergekit rounds the unit tensors and
every iterate to the checkpoints' dtype. --mergekit-compat runs mergekit 0.1.5's operations
instead (float32 norms, unit tensors in the checkpoints' dtype, zero or tiny tensors left out of
the direction): bit-equal, as slow as mergekit."""

import math

import torch

from .base import SameInitMethod, register
from .span import check_finite, checks_finite, combination, gram, mergekit_difference


def karcher_coefficients(grams: torch.Tensor, alphas, max_iter: int = 10, tol: float = 1e-5) -> list[float] | None:
    """c with merge = sum_i c_i t_i, from the tensors' Gram matrix; None when every tensor is
    (nearly) zero (the mergekit form handles that)."""
    norms = grams.diagonal().clamp(min=0).sqrt()
    used = [k for k in range(len(alphas)) if float(norms[k]) > tol]
    if not used:
        return None
    total = sum(alphas[k] for k in used)
    shares = torch.tensor([alphas[k] / total for k in used], dtype=torch.float64)
    scale = norms[used]
    cosines = grams[used][:, used] / torch.outer(scale, scale)  # of the unit tensors d_i

    def length(beta: torch.Tensor) -> float:  # |sum_i beta_i d_i|
        return math.sqrt(max(float(beta @ cosines @ beta), 0.0))

    mean = shares.clone()  # the iterate, as coefficients of the unit tensors
    size = length(mean)
    mean = torch.eye(len(used), dtype=torch.float64)[0] if size < tol else mean / size
    for _ in range(max_iter):
        cos = (cosines @ mean).clamp(-1.0, 1.0)  # <mean, d_i>
        angle = torch.arccos(cos)
        moving = angle >= tol
        factor = torch.where(moving, shares * angle / torch.sin(torch.where(moving, angle, 1.0)), 0.0)
        step = factor - float((factor * cos).sum()) * mean  # sum_i f_i (d_i - cos_i mean)
        step_length = length(step)
        if step_length < tol:
            break
        mean = math.cos(step_length) * mean + math.sin(step_length) * (step / step_length)
        size = length(mean)
        if size > tol:
            mean = mean / size
    factor = sum(alpha * float(n) for alpha, n in zip(alphas, norms))
    coefficients = [0.0] * len(alphas)
    for j, k in enumerate(used):
        coefficients[k] = factor * float(mean[j]) / float(norms[k])
    return coefficients


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
    """mergekit 0.1.5's karcher, operation for operation."""
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
    if not options.mergekit_compat:
        grams = gram(tensors)
        check_finite(name, grams)
        coefficients = karcher_coefficients(grams, alphas, options.max_iter, options.tol)
        if coefficients is not None:  # (else every tensor is about zero)
            return combination(tensors, coefficients, None, out_dtype, out)
    return karcher_tensor(list(tensors), alphas, options.max_iter, options.tol).to(out_dtype)


register(SameInitMethod(name="karcher", merge=merge_karcher, min_models=1, checks_finite=checks_finite,
                        uses=("max_iter", "tol", "mergekit_compat"), mergekit_difference=mergekit_difference))
