"""Query/key dims of attention heads: orthogonal alignment, exact by construction.

Inside a head the scores q . k read the query and key dims only through their inner product, so
any orthogonal R applied to both (q -> R q, k -> R k) keeps the model's function: permutations are
a tiny part of the maps that are exact there, and two independently trained heads agree on their
scores' bilinear form, not on a basis of it. Dense methods (CCA, ZipIt) therefore align these dims
by orthogonal Procrustes per head on the weights that produce them (every query and key row of the
head, biases included), on the models with every other transform applied: R = argmin
||R B - A||_F over orthogonal R, the polar factor of A B^T. Rotary embeddings pair query/key dims
by frequency; the tracer leaves such dims out of the spec, so they never reach this.
"""

from __future__ import annotations

import torch

from ..spec.structure import nested_groups, unfold
from ..spec.transforms import Dense
from ..spec.types import Group, MergeSpec
from .activation import permutation_matrices


def query_key_groups(spec: MergeSpec) -> list[Group]:
    """Groups instanced by another group (per-head dims) that no tap shows and whose members are
    all producer rows: nothing reads them through weights, so the product of the head's queries
    and keys is their only consumer (a group read by anything else has a consumer member, a
    gate role or is fixed by the tracer)."""
    found: dict[str, Group] = {}
    for children in nested_groups(spec).values():
        for group, _ in children:
            if group.tap is None and group.members and all(m.role == "out" for m in group.members):
                found[group.name] = group
    return list(found.values())


def query_key_rotation(group: Group, reference_state: dict, state: dict, perm: torch.Tensor) -> Dense:
    """The orthogonal transform per instance of `group` mapping model `state` (its permutation
    `perm` of the group not yet applied) onto `reference_state`: Procrustes on the rows of every
    member, composed with `perm` (which then only picks the starting basis)."""
    p = permutation_matrices(perm)  # (count, size, size)
    cross = torch.zeros_like(p)
    for m in group.members:
        a = unfold(reference_state[m.tensor].double(), m)  # (count, size, rest)
        b = unfold(state[m.tensor].double(), m)
        cross += a @ (p @ b).transpose(1, 2)
    u, _, vh = torch.linalg.svd(cross)
    full = (u @ vh) @ p
    return Dense(out=full, inp=full.transpose(1, 2))
