"""SLERP: spherical interpolation of two models' tensors at position t from the first (a line where
they are nearly (anti)parallel).

mergekit 0.1.5's formula (a line where |cos| > 0.9995, a norm of at most 1e-8 taken as 1): SLERP
sits close to a line for the nearly parallel tensors of fine-tunes, where two reasonable formulas
differ by far more than rounding. fastmerge takes the angle from the two tensors' Gram matrix in
float64 and writes the interpolation in one fused pass (methods/span.py); with --mergekit-compat
it runs mergekit's float32 operations in their order (norms of 2^20-element chunks, the dot of the
normalised tensors), so a config merged by both gives the same tensors to the bit."""

import math

import torch

from .base import SameInitMethod, register
from .span import check_finite, checks_finite, combination, gram, mergekit_difference

CHUNK_ELEMENTS = 1 << 20  # per norm/dot partial sum, as mergekit chunks them
DOT_THRESHOLD = 0.9995  # |cos| above this: interpolate on the line
NORM_EPS = 1e-8  # a norm at or below this is taken as 1 (a zero tensor stays zero)


def slerp_coefficients(grams: torch.Tensor, t: float) -> list[float]:
    """(c_a, c_b) with SLERP = c_a a + c_b b, from the two tensors' Gram matrix."""
    norm_a, norm_b = (float(x) for x in grams.diagonal().clamp(min=0).sqrt())
    norm_a, norm_b = (norm if norm > NORM_EPS else 1.0 for norm in (norm_a, norm_b))
    dot = min(1.0, max(-1.0, float(grams[0, 1]) / (norm_a * norm_b)))
    if abs(dot) > DOT_THRESHOLD:
        return [1 - t, t]
    theta = math.acos(dot)
    return [math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)]


def slerp_tensor(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """SLERP from `a` (t = 0) to `b` (t = 1), in the float32 (float64) result of mergekit's formula."""
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    x_all, y_all = a.reshape(1, -1), b.reshape(1, -1)
    tt = torch.tensor([[t]], dtype=dtype)
    if not x_all.shape[1]:
        return ((1 - tt) * x_all.to(dtype) + tt * y_all.to(dtype)).reshape(a.shape)
    chunks = [(s, s + CHUNK_ELEMENTS) for s in range(0, x_all.shape[1], CHUNK_ELEMENTS)]
    norm_a = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x_all[:, s:e].to(dtype), dim=1, keepdim=True)
                                                   for s, e in chunks]), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(y_all[:, s:e].to(dtype), dim=1, keepdim=True)
                                                   for s, e in chunks]), dim=0)
    norm_a = torch.where(norm_a > NORM_EPS, norm_a, 1)
    norm_b = torch.where(norm_b > NORM_EPS, norm_b, 1)
    dot = torch.stack([((x_all[:, s:e].to(dtype) / norm_a) * (y_all[:, s:e].to(dtype) / norm_b)).sum(dim=1, keepdim=True)
                       for s, e in chunks]).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    result = torch.empty_like(x_all, dtype=dtype)
    for s, e in chunks:
        result[:, s:e] = coef_a * x_all[:, s:e].to(dtype) + coef_b * y_all[:, s:e].to(dtype)
    return result.reshape(a.shape)


def merge_slerp(name, tensors, base, options, out_dtype, out):
    if not options.mergekit_compat and tensors[0].numel():
        grams = gram(tensors[:2])
        check_finite(name, grams)
        # the inputs' dtype first, as mergekit writes its result, then the output's
        merged = combination(tensors[:2], slerp_coefficients(grams, options.t), None, tensors[0].dtype,
                             out if out_dtype == tensors[0].dtype else None)
        return merged.to(out_dtype)
    # mergekit writes its float32 result into the inputs' dtype; then the output's (one rounding
    # when they are the same)
    return slerp_tensor(tensors[0], tensors[1], options.t).to(tensors[0].dtype).to(out_dtype)


register(SameInitMethod(name="slerp", merge=merge_slerp, min_models=2, max_models=2, checks_finite=checks_finite,
                        uses=("t", "mergekit_compat"), mergekit_difference=mergekit_difference))
