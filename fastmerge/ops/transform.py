"""Batched per-axis weight transforms: permutations and dense (or per-head block) matrices.

A job ``AxisJob(tensor, axis, transform)`` rewrites one axis of one tensor:

* ``transform`` an integer vector ``idx`` of length m: ``out[..., i, ...] = W[..., idx[i], ...]``
  (a permutation when m == n; any gather, e.g. ZipIt's unmerge, otherwise);
* a float matrix ``M`` of shape (m, n): ``out[..., i, ...] = sum_j M[i, j] W[..., j, ...]``;
* float blocks of shape (h, m_h, n_h): block-diagonal ``M`` with h blocks (one per attention head),
  acting on an axis of size h * n_h.

Producing rows of a Linear layer with a transform T: ``AxisJob(w, 0, T)``. Consuming columns with
``W <- W T^-1``: ``AxisJob(w, 1, T^-1 transposed)``; for a permutation ``idx``, the same ``idx``.
Several jobs on one tensor apply in order. Inputs are never modified; every output is new.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from .. import _ext
from ..errors import IndexOutOfRangeError, ShapeMismatchError


class AxisJob(NamedTuple):
    tensor: int
    axis: int
    transform: torch.Tensor


def transform_axes(tensors: Sequence[torch.Tensor], jobs: Sequence[AxisJob | tuple]) -> list[torch.Tensor]:
    """Applies every job and returns one new tensor per input (untouched ones are copied).

    Args:
        tensors: the weights, any shapes and floating dtypes.
        jobs: ``(tensor_index, axis, transform)`` triples, see the module docstring.

    Returns:
        New tensors in the input order, each in its input's dtype (half/bfloat16 are transformed in
        float32, float32 weights with float64 matrices in float64). They are plain tensors with no
        autograd history: aligning weights is not part of a training graph.

    Raises:
        IndexOutOfRangeError: a job names a missing tensor or axis, or an index is out of range.
        ShapeMismatchError: a transform does not fit its axis, or a dense transform meets a
            non-floating tensor.
    """
    jobs = [AxisJob(*job) for job in jobs]
    _check_jobs(tensors, jobs)
    with torch.no_grad():
        if _ext.load():
            try:
                return torch.ops.fastmerge.transform_axes(
                    [t.detach() for t in tensors], [j.transform for j in jobs], [j.tensor for j in jobs],
                    [j.axis for j in jobs]
                )
            except IndexError as exc:
                raise IndexOutOfRangeError(str(exc)) from None
        _ext.warn_fallback()
        return transform_axes_reference([t.detach() for t in tensors], jobs)


def _check_jobs(tensors: Sequence[torch.Tensor], jobs: Sequence[AxisJob]) -> None:
    """Validates every job against the shapes it will meet, with typed, named errors."""
    shapes = [list(t.shape) for t in tensors]
    for q, job in enumerate(jobs):
        if not 0 <= job.tensor < len(tensors):
            raise IndexOutOfRangeError(f"job {q} names tensor {job.tensor}, but {len(tensors)} tensors were given")
        shape = shapes[job.tensor]
        if not -len(shape) <= job.axis < len(shape) or not shape:
            raise IndexOutOfRangeError(f"job {q} names axis {job.axis} of tensor {job.tensor} with shape {tuple(shape)}")
        if job.transform.is_floating_point() and not tensors[job.tensor].is_floating_point():
            raise ShapeMismatchError(
                f"job {q}: a dense transform needs a floating-point tensor, tensor {job.tensor} is "
                f"{tensors[job.tensor].dtype} (integer tensors take index transforms only)"
            )
        axis = job.axis % len(shape)
        shape[axis] = transformed_size(job.transform, shape[axis], where=f"job {q} (tensor {job.tensor}, axis {axis})")


def transformed_size(transform: torch.Tensor, n: int, *, where: str = "transform") -> int:
    """Size of an axis of size n after the transform; raises ShapeMismatchError when it cannot act."""
    if not transform.is_floating_point():
        if transform.dim() != 1:
            raise ShapeMismatchError(f"{where}: an index transform must be 1-D, got shape {tuple(transform.shape)}")
        return transform.shape[0]
    if transform.dim() == 2:
        if transform.shape[1] != n:
            raise ShapeMismatchError(f"{where}: matrix of shape {tuple(transform.shape)} cannot act on an axis of size {n}")
        return transform.shape[0]
    if transform.dim() == 3:
        h, m_h, n_h = transform.shape
        if h * n_h != n:
            raise ShapeMismatchError(
                f"{where}: {h} blocks of shape ({m_h}, {n_h}) cannot act on an axis of size {n}"
            )
        return h * m_h
    raise ShapeMismatchError(
        f"{where}: a transform is an integer index (m,), a matrix (m, n) or blocks (h, m, n); got {tuple(transform.shape)}"
    )


def transform_axes_reference(tensors: Sequence[torch.Tensor], jobs: Sequence[AxisJob]) -> list[torch.Tensor]:
    """Pure-torch version of the transform_axes op, computed in float64 (tests and fallback)."""
    out = [t.clone() for t in tensors]
    for job in jobs:
        w = out[job.tensor]
        axis = job.axis % w.dim()
        if not job.transform.is_floating_point():
            idx = job.transform.long()
            if idx.numel() and (idx.min() < 0 or idx.max() >= w.shape[axis]):
                raise IndexOutOfRangeError(f"index outside the axis of size {w.shape[axis]} (axis {axis})")
            out[job.tensor] = w.index_select(axis, idx)
            continue
        m = job.transform.to(torch.float64)
        blocks = m if m.dim() == 3 else m.unsqueeze(0)
        h, m_h, n_h = blocks.shape
        moved = w.to(torch.float64).movedim(axis, 0)
        rest = moved.shape[1:]
        x = moved.reshape(h, n_h, rest.numel())
        y = torch.einsum("hmn,hnr->hmr", blocks, x).reshape(h * m_h, *rest)
        out[job.tensor] = y.movedim(0, axis).to(w.dtype).contiguous()
    return out
