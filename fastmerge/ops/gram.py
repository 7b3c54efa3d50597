"""The Gram matrix of k tensors (or of their differences from a base) in float64: the inner
products from which SLERP, Model Stock, NuSLERP, Multi-SLERP and the Karcher mean take their coefficients
(fastmerge.merging.methods.span). The compiled kernel (csrc/kernels/gram.h) reads every input once,
widens each entry to float64 once and sums in a fixed order (the same bits for any thread count);
anything else (float64, CUDA tensors, no compiled library) runs the torch reference."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _ext
from ..errors import ShapeMismatchError
from .same_init import FUSED_DTYPES

MAX_MODELS = 16  # the compiled kernel's limit; more tensors run the reference
REFERENCE_CHUNK = 1 << 16  # entries per step of the reference: its float64 copies stay in cache


def gram(tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None) -> torch.Tensor:
    """G[i, j] = <t_i - base, t_j - base> (without a base: <t_i, t_j>), a (k, k) float64 tensor."""
    first = base if base is not None else tensors[0]
    for i, t in enumerate(tensors):
        if t.shape != first.shape:
            raise ShapeMismatchError(f"gram: tensor {i} has shape {tuple(t.shape)}, expected {tuple(first.shape)}")
    every = [*tensors, *([base] if base is not None else [])]
    if (len(tensors) <= MAX_MODELS and first.dtype in FUSED_DTYPES and all(t.dtype == first.dtype for t in every)
            and all(t.device.type == "cpu" for t in every) and _ext.load()):
        return torch.ops.fastmerge.gram(list(tensors), base)
    return gram_reference(tensors, base)


def gram_reference(tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None) -> torch.Tensor:
    """gram in torch: chunks of every input widened to float64, one small product per chunk."""
    flat = [t.reshape(-1) for t in tensors]
    flat_base = base.reshape(-1) if base is not None else None
    numel = flat[0].numel()
    result = torch.zeros(len(flat), len(flat), dtype=torch.float64, device=flat[0].device)
    rows = torch.empty(len(flat), min(REFERENCE_CHUNK, numel), dtype=torch.float64, device=flat[0].device)
    shift = torch.empty(rows.shape[1], dtype=torch.float64, device=flat[0].device)
    for start in range(0, numel, REFERENCE_CHUNK):
        end = min(start + REFERENCE_CHUNK, numel)
        chunk = rows[:, : end - start]
        for row, t in zip(chunk, flat):
            row.copy_(t[start:end])
        if flat_base is not None:
            chunk -= shift[: end - start].copy_(flat_base[start:end])
        result.addmm_(chunk, chunk.T)
    return result
