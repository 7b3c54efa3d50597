"""NuSLERP: spherical interpolation of two models, at t = w_2 / (w_1 + w_2) from their weights
(0.5 when the weights sum to about 0), of the whole tensor (flatten, the default), of its rows
(nuslerp_row_wise) or of its last dimension; with a base, of the two task vectors, added to the
base. Whole tensors (the default): the angle from the two tensors' Gram matrix in float64, the
interpolation in one fused pass (methods/span.py), where mergekit rounds the unit tensors and the
result to the checkpoints' dtype. Rows, the last dimension and --mergekit-compat: mergekit 0.1.5's
arithmetic, operation for operation, so a config merged by both gives the same tensors to the bit."""

import math

import torch

from .base import SameInitMethod, register, task_weights
from .span import check_finite, combination, gram, mergekit_difference


def nuslerp_coefficients(grams: torch.Tensor, t: float, eps: float = 1e-8) -> list[float]:
    """(c0, c1) with merge = c0 v0 + c1 v1: SLERP at t, a line where the two are (anti)parallel."""
    norms = grams.diagonal().clamp(min=0).sqrt().clamp(min=1e-7)
    cos = float((grams[0, 1] / (norms[0] * norms[1])).clamp(-1, 1))
    if 1 - cos * cos <= eps**2:
        return [1 - t, t]
    theta = math.acos(cos)
    return [math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)]


def _unit(x: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=eps)


def nuslerp_tensor(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int = -1, flatten: bool = False,
                   eps: float = 1e-8) -> torch.Tensor:
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    cos = torch.sum(_unit(v0) * _unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(shape)


def merge_nuslerp(name, tensors, base, options, out_dtype, out):
    weights = task_weights(options, 2)
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    dim = 0 if options.row_wise else -1
    flatten = options.flatten is not False
    if flatten and not options.mergekit_compat:
        grams = gram(tensors, base)
        check_finite(name, grams)
        return combination(tensors, nuslerp_coefficients(grams, t), base, out_dtype, out)
    if base is not None:
        return (base + nuslerp_tensor(t, tensors[0] - base, tensors[1] - base, dim, flatten)).to(out_dtype)
    return nuslerp_tensor(t, tensors[0], tensors[1], dim, flatten).to(out_dtype)


register(SameInitMethod(name="nuslerp", merge=merge_nuslerp, min_models=2, max_models=2,
                        checks_finite=lambda options: options.flatten is not False and not options.mergekit_compat,
                        uses=("weights", "row_wise", "flatten", "mergekit_compat"),
                        mergekit_difference=lambda options, dtype: mergekit_difference(options, dtype)
                        if options.flatten is not False else None))
