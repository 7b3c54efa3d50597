"""SLERP: spherical interpolation of two models' tensors at position t (a line where they are
(anti)parallel or zero), in float32."""

import math

import torch

from .base import SameInitMethod, register


def _slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-6) -> torch.Tensor:
    a32, b32 = a.float(), b.float()
    na, nb = a32.norm(), b32.norm()
    if na == 0 or nb == 0:
        return (1 - t) * a32 + t * b32
    cos = float((a32.reshape(-1) @ b32.reshape(-1)) / (na * nb))
    if abs(cos) > 1 - eps:  # nearly parallel: the arc is a line
        return (1 - t) * a32 + t * b32
    omega = math.acos(max(-1.0, min(1.0, cos)))
    s = math.sin(omega)
    return (math.sin((1 - t) * omega) / s) * a32 + (math.sin(t * omega) / s) * b32


def merge_slerp(name, tensors, base, options, out_dtype, out):
    return _slerp(tensors[0], tensors[1], options.t).to(out_dtype)


register(SameInitMethod(name="slerp", merge=merge_slerp, min_models=2, max_models=2, uses=("t",)))
