"""Merges whose result is a linear combination of the inputs, with coefficients that depend only
on the inputs' inner products: Model Stock, Multi-SLERP, NuSLERP (whole tensors) and the Karcher
mean. One pass reads the Gram matrix (float64), the coefficients follow from it in closed form or
by iterating on k numbers instead of k tensors, and one fused combination (float32 accumulation,
into the output buffer) writes the result: about the cost of a linear merge.

mergekit computes the same formulas tensor-wide in the checkpoints' dtype, rounding every
intermediate (bfloat16: 2^-9 relative), so the two differ by about that rounding; with
--mergekit-compat each method runs mergekit's operations instead (bit-equal, as slow as mergekit)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...errors import NonFiniteError
from ...ops import combine
from ...ops.same_init import dare_merge
from .base import combine_target

GRAM_CHUNK = 1 << 16  # entries per step: the float64 copies of every input's chunk stay in cache


def gram(tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None) -> torch.Tensor:
    """G[i, j] = <t_i - base, t_j - base> (without a base: <t_i, t_j>) in float64, over the whole tensors."""
    flat = [t.reshape(-1) for t in tensors]
    flat_base = base.reshape(-1) if base is not None else None
    numel = flat[0].numel()
    result = torch.zeros(len(flat), len(flat), dtype=torch.float64, device=flat[0].device)
    rows = torch.empty(len(flat), min(GRAM_CHUNK, numel), dtype=torch.float64, device=flat[0].device)
    shift = torch.empty(rows.shape[1], dtype=torch.float64, device=flat[0].device)
    for start in range(0, numel, GRAM_CHUNK):
        end = min(start + GRAM_CHUNK, numel)
        chunk = rows[:, : end - start]
        for row, t in zip(chunk, flat):
            row.copy_(t[start:end])
        if flat_base is not None:
            chunk -= shift[: end - start].copy_(flat_base[start:end])
        result.addmm_(chunk, chunk.T)
    return result


def check_finite(name: str, grams: torch.Tensor) -> None:
    """A NaN/Inf entry in any input (or the base) makes its diagonal entry NaN/Inf, and finite
    entries cannot overflow float64: this stands in for the pipeline's check of the inputs."""
    if not bool(torch.isfinite(grams).all()):
        raise NonFiniteError(f"tensor {name!r}: an input holds NaN/Inf entries")


def checks_finite(options) -> bool:
    """Whether the method raises NonFiniteError itself for these options (from the Gram matrix)."""
    return not options.mergekit_compat


def combination(tensors: Sequence[torch.Tensor], coefficients: Sequence[float], base: torch.Tensor | None,
                out_dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    """sum_i c_i t_i, or with a base base + sum_i c_i (t_i - base): one fused pass (the task
    vectors formed in float32 entry by entry: DARE's kernel keeping every entry, so small task
    vectors of a large base lose nothing to cancellation)."""
    weights = [float(c) for c in coefficients]
    if base is not None:
        return dare_merge(tensors, base, weights, [0] * len(tensors), 1.0, out_dtype, out)
    return combine([[t] for t in tensors], weights=weights, out=combine_target(out, out_dtype, tensors))[0].to(out_dtype)
