"""Karcher mean: the models' weighted (uniform) mean direction on the unit hypersphere, found by a
few Riemannian gradient steps (max_iter, until the step is below tol), scaled by their mean
norm. mergekit 0.1.5's arithmetic, operation for operation, so a config merged by both gives the
same tensors to the bit."""

import torch

from .base import SameInitMethod, register


def karcher_tensor(tensors, alphas, max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0]
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms, units = [], []
    for tensor in tensors:
        norm = torch.linalg.vector_norm(tensor.to(dtype))
        norms.append(norm)
        units.append(torch.zeros_like(tensor) if norm.item() == 0.0 else (tensor / norm).to(tensor.dtype))
    valid = [i for i, norm in enumerate(norms) if norm.item() > tol]
    if not valid:
        return sum(tensor * 0 for tensor in tensors)
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    valid_units = [units[i] for i in valid]
    mean = torch.zeros_like(valid_units[0])
    for alpha, unit in zip(weights, valid_units):
        mean += alpha * unit
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = valid_units[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for alpha, unit in zip(weights, valid_units):
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += alpha * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(dtype))
        if tangent_norm.item() < tol:
            break
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    return sum(alpha * norm for alpha, norm in zip(alphas, norms)) * mean


def merge_karcher(name, tensors, base, options, out_dtype, out):
    alphas = [1.0 / len(tensors)] * len(tensors)
    return karcher_tensor(list(tensors), alphas, options.max_iter, options.tol).to(out_dtype)


register(SameInitMethod(name="karcher", merge=merge_karcher, min_models=1, uses=("max_iter", "tol")))
