"""Fused weighted combination of k models' tensors: ``out_t = sum_j c_tj * W_tj`` in one call.

Coefficients are either one scalar per model (``weights``) or tensors (``coefficients``) that are
scalars, per-entry (the weight's shape) or per-leading-axes such as per output channel (shape
``W.shape[:r] + (1,) * (ndim - r)``). Gradients flow to coefficient tensors (NP Merge trains them)
through a fused multi-tensor backward op, and to the weights (c * grad, in torch).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _ext
from ..errors import InvalidArgumentError, ShapeMismatchError


def combine(
    models: Sequence[Sequence[torch.Tensor]],
    *,
    weights: Sequence[float] | None = None,
    coefficients: Sequence[Sequence[torch.Tensor]] | None = None,
    out: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Weighted sum of the models' tensors, tensor by tensor.

    Args:
        models: ``models[j][t]`` is tensor t of model j; every model lists the same shapes and dtypes.
        weights: one scalar per model (default: uniform 1/k). Exclusive with ``coefficients``.
        coefficients: ``coefficients[j][t]`` multiplies ``models[j][t]``; float32/float64, shaped
            as described in the module docstring.
        out: optional preallocated contiguous outputs, one per tensor (no autograd through them).
            Reusing buffers avoids the page faults of fresh memory, which on large models cost
            more than the combination itself.

    Returns:
        One tensor per position t, in the models' dtype (accumulated in float32, or float64 for
        float64 weights).
    """
    k = len(models)
    if k == 0:
        raise InvalidArgumentError("combine needs at least one model")
    num_tensors = len(models[0])
    for j, tensors in enumerate(models):
        if len(tensors) != num_tensors:
            raise ShapeMismatchError(f"model {j} has {len(tensors)} tensors, model 0 has {num_tensors}")
    flat = [models[j][t] for t in range(num_tensors) for j in range(k)]
    for t in range(num_tensors):
        ref = models[0][t]
        if not ref.is_floating_point():
            raise ShapeMismatchError(f"tensor {t} of model 0 is {ref.dtype}; combine needs floating-point tensors")
        for j in range(1, k):
            w = models[j][t]
            if w.shape != ref.shape or w.dtype != ref.dtype:
                raise ShapeMismatchError(
                    f"tensor {t}: model {j} has shape {tuple(w.shape)} {w.dtype}, model 0 has {tuple(ref.shape)} {ref.dtype}"
                )
    if coefficients is not None and weights is not None:
        raise InvalidArgumentError("give either weights or coefficients, not both")
    if coefficients is not None:
        if len(coefficients) != k or any(len(c) != num_tensors for c in coefficients):
            raise ShapeMismatchError(f"coefficients must be {k} lists of {num_tensors} tensors (one per model and tensor)")
        flat_coef = [coefficients[j][t] for t in range(num_tensors) for j in range(k)]
        for index, (c, w) in enumerate(zip(flat_coef, flat)):
            check_coefficient_shape(c, w, where=f"coefficients[{index % k}][{index // k}]")
        scalars: list[float] = []
    else:
        flat_coef = []
        scalars = [1.0 / k] * k if weights is None else [float(w) for w in weights]
        if len(scalars) != k:
            raise ShapeMismatchError(f"weights has {len(scalars)} entries for {k} models")
    if out is not None:
        out = list(out)
        if len(out) != num_tensors:
            raise ShapeMismatchError(f"out has {len(out)} tensors, expected {num_tensors}")
        for t, o in enumerate(out):
            ref = models[0][t]
            if o.shape != ref.shape or o.dtype != ref.dtype or not o.is_contiguous():
                raise ShapeMismatchError(
                    f"out[{t}] must be a contiguous {ref.dtype} tensor of shape {tuple(ref.shape)}, "
                    f"got {o.dtype} {tuple(o.shape)}"
                )
        inputs = {x.untyped_storage().data_ptr() for x in flat + flat_coef if x.numel()}
        if any(o.numel() and o.untyped_storage().data_ptr() in inputs for o in out):
            raise InvalidArgumentError("out must not share memory with the inputs; pass fresh buffers")
    if _ext.load():
        if out is None:
            return torch.ops.fastmerge.combine(flat, flat_coef, scalars, k)
        torch.ops.fastmerge.combine_out(flat, flat_coef, scalars, k, out)
        return out
    _ext.warn_fallback()
    result = combine_reference(flat, flat_coef, scalars, k)
    if out is None:
        return result
    for o, r in zip(out, result):
        o.copy_(r)
    return out


def check_coefficient_shape(coef: torch.Tensor, weight: torch.Tensor, *, where: str) -> None:
    """Coefficients broadcast along trailing axes only: one value, full shape, or leading axes + 1s."""
    if coef.dtype not in (torch.float32, torch.float64):
        raise ShapeMismatchError(f"{where}: coefficients must be float32 or float64, got {coef.dtype}")
    if coef.numel() == 1:
        return
    ok = coef.dim() == weight.dim()
    if ok:
        r = 0
        while r < coef.dim() and coef.shape[r] == weight.shape[r]:
            r += 1
        ok = all(s == 1 for s in coef.shape[r:])
    if not ok:
        raise ShapeMismatchError(
            f"{where}: coefficient shape {tuple(coef.shape)} does not fit weight {tuple(weight.shape)}; use one value, "
            "the full shape, or leading axes followed by 1s (e.g. (out, 1) per output channel)"
        )


def combine_reference(
    tensors: Sequence[torch.Tensor], coefficients: Sequence[torch.Tensor], weights: Sequence[float], num_models: int
) -> list[torch.Tensor]:
    """Pure-torch version of the combine op on the flat tensor-major lists (float64 accumulation)."""
    out = []
    for t in range(len(tensors) // num_models):
        acc = None
        for j in range(num_models):
            w = tensors[t * num_models + j]
            c = coefficients[t * num_models + j] if coefficients else weights[j]
            term = c * w.to(torch.float64) if not isinstance(c, torch.Tensor) else c.to(torch.float64) * w.to(torch.float64)
            acc = term if acc is None else acc + term
        out.append(acc.reshape(tensors[t * num_models].shape).to(tensors[t * num_models].dtype))
    return out
