"""Multi-SLERP: barycentric interpolation of any number of models on a hypersphere: each tensor
(or task vector, with a base) scaled to unit length, their weighted mean direction, the weighted
average of their projections on its tangent space mapped back to the sphere, the result scaled by
the weighted mean length (and the base added back).

Written to agree with mergekit 0.1.5's multislerp to the bit (the same float operations in the
same order, in the checkpoints' dtype; a line for two opposite tensors whose weights balance)."""

import torch

from ...errors import InvalidArgumentError
from .base import SameInitMethod, register, task_weights


def _exp_map(point: torch.Tensor, tangent: torch.Tensor, eps: float) -> torch.Tensor:
    length = torch.norm(tangent) + eps
    return point * torch.cos(length) + tangent * (torch.sin(length) / length)


def multislerp_tensor(name: str, tensors, weights, base=None, normalize_weights: bool = True,
                      eps: float = 1e-8) -> torch.Tensor:
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
        if points.shape[0] != 2:
            raise InvalidArgumentError(f"tensor {name!r}: multislerp's weighted mean direction is zero (opposite "
                                       "tensors whose weights balance out); use other weights")
        merged = (points[0] * w[0] + points[1] * w[1]).view(points.shape[1:])
    else:
        centre = centre / centre_length
        tangents = units - (units * centre).sum(-1, keepdim=True) * centre
        on_sphere = _exp_map(centre, (tangents * w.view(-1, 1)).sum(0), eps)
        merged = (on_sphere * (lengths.squeeze(-1) * w).sum()).view(points.shape[1:])
    return merged + base if base is not None else merged


def merge_multislerp(name, tensors, base, options, out_dtype, out):
    weights = task_weights(options, len(tensors))
    return multislerp_tensor(name, tensors, weights, base, options.normalize is not False).to(out_dtype)


register(SameInitMethod(name="multislerp", merge=merge_multislerp, min_models=1, uses=("weights", "normalize")))
