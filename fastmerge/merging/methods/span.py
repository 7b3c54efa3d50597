"""Merges whose result is a linear combination of the inputs, with coefficients that depend only
on the inputs' inner products: SLERP, Model Stock, Multi-SLERP, NuSLERP (whole tensors) and the
Karcher mean. One pass reads the Gram matrix (float64, fastmerge.ops.gram), the coefficients
follow from it in closed form or by iterating on k numbers instead of k tensors, and one fused
combination (float32 accumulation, into the output buffer) writes the result: about the cost of a
linear merge.

mergekit computes the same formulas tensor-wide in the checkpoints' dtype, rounding every
intermediate (bfloat16: 2^-9 relative), so the two differ by about that rounding; with
--mergekit-compat each method runs mergekit's operations instead (bit-equal, as slow as mergekit)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...errors import NonFiniteError
from ...ops import combine
from ...ops.gram import gram
from ...ops.same_init import dare_merge
from .base import combine_target

__all__ = ["check_finite", "checks_finite", "combination", "gram", "mergekit_difference"]


def check_finite(name: str, grams: torch.Tensor) -> None:
    """A NaN/Inf entry in any input (or the base) makes its diagonal entry NaN/Inf, and finite
    entries cannot overflow float64: this stands in for the pipeline's check of the inputs."""
    if not bool(torch.isfinite(grams).all()):
        raise NonFiniteError(f"tensor {name!r}: an input holds NaN/Inf entries")


def mergekit_difference(options, dtype) -> str | None:
    """How these methods differ from mergekit's arithmetic (without --mergekit-compat)."""
    return None if options.mergekit_compat else ("angles from a float64 Gram matrix, the result in one fused pass; "
                                                 "mergekit rounds every intermediate, so the two differ by rounding")


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
