"""Transforms of a spec's groups and their application to weights.

A group's transform is a permutation per instance ((count, size) LongTensor) or a `Dense` pair of
matrices. `apply_transforms` lands every group's transform on every member axis of a state dict in
one batched call of the engine's transform op; the spec itself (fastmerge.spec.types) stays data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import ShapeMismatchError
from ..ops import AxisJob, transform_axes
from ..stages import timed
from .types import MergeSpec


@dataclass(frozen=True)
class Dense:
    """A dense transform of a group, per instance: ``out`` (count, size, size) acts on producer rows
    and per-unit parameters (W <- A W); ``inp`` (count, size, size) on consumer columns
    (W <- W B). For an invertible T: out = T, inp = T^-1 (CCA); ZipIt: merge / unmerge matrices."""

    out: torch.Tensor
    inp: torch.Tensor


def transform_jobs(spec: MergeSpec, shapes: Mapping[str, Sequence[int]], transforms: Mapping[str, object]):
    """Yields (tensor name, axis, transform) in application order: a gather index for a
    permutation ((count, size) LongTensor), a matrix for a Dense transform. Groups missing
    from `transforms` stay; members on tensors missing from `shapes` are skipped."""
    for g in spec.groups:
        t = transforms.get(g.name)
        if t is None:
            continue
        if isinstance(t, Dense):
            if tuple(t.out.shape) != (g.count, g.size, g.size) or tuple(t.inp.shape) != (g.count, g.size, g.size):
                raise ShapeMismatchError(f"dense transform of group {g.name!r} must be ({g.count}, {g.size}, {g.size})")
        elif tuple(t.shape) != (g.count, g.size):
            raise ShapeMismatchError(f"permutations for group {g.name!r} must have shape ({g.count}, {g.size}), got {tuple(t.shape)}")
        for m in g.members:
            if m.tensor not in shapes:
                continue
            n = shapes[m.tensor][m.axis]
            if not isinstance(t, Dense):
                yield m.tensor, m.axis, m.gather_index(n, t)
            elif m.role == "in":  # W <- W B: new[.., u] = sum_v old[.., v] B[v, u]
                yield m.tensor, m.axis, m.dense_matrix(n, t.inp.transpose(-1, -2))
            else:  # producer rows and per-unit parameters: new = A old
                yield m.tensor, m.axis, m.dense_matrix(n, t.out)
@timed("transforms")
def apply_transforms(spec: MergeSpec, state: Mapping[str, torch.Tensor],
                     transforms: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """A new state dict with every group's transform (a permutation or a Dense) applied, in one
    batched op call; `state` is left as it is."""
    names = list(state)
    position = {n: i for i, n in enumerate(names)}
    shapes = {n: tuple(t.shape) for n, t in state.items()}
    jobs = [AxisJob(position[t], axis, m) for t, axis, m in transform_jobs(spec, shapes, transforms)]
    out = transform_axes([state[n] for n in names], jobs)
    return dict(zip(names, out))


# permutations are transforms too: the same call, named for what it is given
apply_permutations = apply_transforms
