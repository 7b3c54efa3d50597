"""Multi-SLERP: barycentric interpolation of any number of models on a hypersphere: each tensor
(or task vector, with a base) scaled to unit length, their weighted mean direction, the weighted
average of their projections on its tangent space mapped back to the sphere, the result scaled by
the weighted mean length (and the base added back).

The weighted tangent vectors always sum to zero (their sum is the mean direction minus its own
projection), so the exponential map returns the mean direction itself: the merge is the
normalised weighted mean of the unit tensors, a linear combination whose coefficients come from
the inputs' Gram matrix (methods/span.py). mergekit computes the tangents in the checkpoints'
dtype, where they are rounding noise of that size; --mergekit-compat runs mergekit's operations
(bit-equal; a line for two opposite tensors whose weights balance, in both)."""

import math

import torch

from ...errors import InvalidArgumentError
from .base import SameInitMethod, register, task_weights
from .span import check_finite, checks_finite, combination, gram, mergekit_difference


def _no_mean_direction(name: str, count: int) -> None:
    if count != 2:
        raise InvalidArgumentError(f"tensor {name!r}: multislerp's weighted mean direction is zero (opposite "
                                   "tensors whose weights balance out); use other weights")


def multislerp_coefficients(name: str, grams: torch.Tensor, weights, normalize_weights: bool = True,
                            eps: float = 1e-8) -> list[float]:
    """c with merge = sum_i c_i p_i (p_i the tensors or task vectors, grams their Gram matrix)."""
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    if normalize_weights:
        w = w / w.sum()
    lengths = grams.diagonal().clamp(min=0).sqrt()
    a = w / (lengths + eps)  # centre = sum_i a_i p_i (the weighted mean of the unit tensors)
    centre_length = math.sqrt(max(float(a @ grams @ a), 0.0))
    if centre_length < eps:
        _no_mean_direction(name, len(a))
        return w.tolist()  # the line between the two
    # mergekit's exponential map adds eps to the tangent's length, which is zero here: the mean
    # direction comes back scaled by cos(eps) (1 to float64 precision at the default 1e-8)
    return (a * (float((lengths * w).sum()) / centre_length * math.cos(eps))).tolist()


def _exp_map(point: torch.Tensor, tangent: torch.Tensor, eps: float) -> torch.Tensor:
    length = torch.norm(tangent) + eps
    return point * torch.cos(length) + tangent * (torch.sin(length) / length)


def multislerp_tensor(name: str, tensors, weights, base=None, normalize_weights: bool = True,
                      eps: float = 1e-8) -> torch.Tensor:
    """mergekit 0.1.5's multislerp, operation for operation in the tensors' dtype."""
    if len(tensors) == 1:
        return tensors[0]
    points = torch.stack(list(tensors), dim=0)
    if base is not None:
        points -= base
    rows = points.view(points.shape[0], -1)
    w = torch.tensor(list(weights), dtype=points.dtype, device=points.device)
    if normalize_weights:
        w = w / w.sum()
    lengths = torch.norm(rows, dim=-1, keepdim=True)
    units = rows / (lengths + eps)
    centre = (units * w.view(-1, 1)).sum(0)
    centre_length = torch.norm(centre)
    if centre_length < eps:  # no mean direction
        _no_mean_direction(name, points.shape[0])
        merged = (points[0] * w[0] + points[1] * w[1]).view(points.shape[1:])
    else:
        centre = centre / centre_length
        tangents = units - (units * centre).sum(-1, keepdim=True) * centre
        on_sphere = _exp_map(centre, (tangents * w.view(-1, 1)).sum(0), eps)
        merged = (on_sphere * (lengths.squeeze(-1) * w).sum()).view(points.shape[1:])
    return merged + base if base is not None else merged


def merge_multislerp(name, tensors, base, options, out_dtype, out):
    weights = task_weights(options, len(tensors))
    normalize = options.normalize is not False
    if options.mergekit_compat:
        return multislerp_tensor(name, tensors, weights, base, normalize, options.eps).to(out_dtype)
    grams = gram(tensors, base)
    check_finite(name, grams)
    return combination(tensors, multislerp_coefficients(name, grams, weights, normalize, options.eps), base,
                       out_dtype, out)


register(SameInitMethod(name="multislerp", merge=merge_multislerp, min_models=1, checks_finite=checks_finite,
                        uses=("weights", "normalize", "eps", "mergekit_compat"), mergekit_difference=mergekit_difference))
