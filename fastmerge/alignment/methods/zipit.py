"""ZipIt: greedy merging of the joint features of all models (within a model too, up to the budget
beta), as dense merge / unmerge matrices on the groups where they are exact."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...spec.transforms import Dense
from ..activation import zipit_matrices
from .base import AlignmentMethod, register


@dataclass(frozen=True)
class ZipItOptions:
    """alpha: decay of a merged feature's similarity; beta: within-model merge budget."""

    alpha: float = 0.5
    beta: float = 0.0


# far below any real correlation difference: decides only between exactly tied pairs
_TIE_BREAK = 1e-6


def _matching_bonus(perms, n: int, size: int):
    """(nC, nC) indicator of the pairs the activation matching put together (unit u of the
    reference with unit perms[i][u] of model i, and those of two other models with each other)."""
    joined = torch.zeros(n * size, n * size, dtype=torch.float64)
    index = torch.stack([perms[i][0].cpu() + i * size for i in range(n)])  # (n, size): the units matched to u
    for i in range(n):
        for j in range(n):
            if i != j:
                joined[index[i], index[j]] = 1.0
    return joined


def zipit_dense(group, stats, *, reference: int, n: int, options: ZipItOptions, info: dict, perms=None) -> list:
    state = stats.states[group.name]
    rho = state.joint_correlation().cpu()
    if perms is not None:
        # Dead (constant) units correlate with nothing: every merge involving them ties at 0, and the
        # greedy order would put them into live clusters arbitrarily, changing the merged function.
        # The activation matching broke those ties by incoming weights; follow it among ties.
        rho = rho + _TIE_BREAK * _matching_bonus(perms, n, group.size)
    # the greedy matching is sequential: it runs on the host, whatever the statistics' device
    merge, unmerge = zipit_matrices(rho.numpy(), n, group.size, alpha=options.alpha, beta=options.beta)
    device = state.count.device
    c = group.size
    out = []
    for i in range(n):
        # n * M_i: the 1/n of ZipIt's average moves into the uniform combination
        m = torch.from_numpy(n * merge[:, i * c : (i + 1) * c]).to(device)
        u = torch.from_numpy(unmerge[i * c : (i + 1) * c, :]).to(device)
        out.append(Dense(out=m[None], inp=u[None]))
    return out


register(AlignmentMethod(name="zipit", label="ZipIt", options=ZipItOptions, statistics="full", dense=zipit_dense,
                         grid=lambda n: [{"alpha": a, "beta": b} for a in (0.5, 1.0) for b in (0.0, 0.25)],
                         grid_label="alpha/beta"))
