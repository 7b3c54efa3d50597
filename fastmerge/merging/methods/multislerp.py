"""Multi-SLERP: barycentric interpolation of any number of models on a hypersphere (each tensor
scaled to unit norm, the weighted mean direction, the tangent-space average mapped back, scaled
by the weighted mean norm); with a base, of the task vectors, added to the base. mergekit 0.1.5's
arithmetic, operation for operation and in the checkpoints' dtype, so a config merged by both
gives the same tensors to the bit."""

import torch

from ...errors import InvalidArgumentError
from .base import SameInitMethod, register, task_weights


def multislerp_tensor(name: str, tensors, weights, base=None, normalize_weights: bool = True,
                      eps: float = 1e-8) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0]
    stacked = torch.stack(list(tensors), dim=0)
    if base is not None:
        stacked -= base
    flat = stacked.view(stacked.shape[0], -1)
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if stacked.shape[0] != 2:
            raise InvalidArgumentError(f"tensor {name!r}: multislerp's weighted mean direction is zero (antipodal "
                                       "tensors whose weights balance out); use other weights")
        result = (stacked[0] * w[0] + stacked[1] * w[1]).view(stacked.shape[1:])  # a line, as mergekit falls back
        return result + base if base is not None else result
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * w.view(-1, 1)).sum(0)
    length = torch.norm(tangent) + eps
    result = mean * torch.cos(length) + tangent * (torch.sin(length) / length)
    result = (result * (norms.squeeze(-1) * w).sum()).view(stacked.shape[1:])
    return result + base if base is not None else result


def merge_multislerp(name, tensors, base, options, out_dtype, out):
    weights = task_weights(options, len(tensors))
    return multislerp_tensor(name, tensors, weights, base, options.normalize is not False).to(out_dtype)


register(SameInitMethod(name="multislerp", merge=merge_multislerp, min_models=1, uses=("weights", "normalize")))
