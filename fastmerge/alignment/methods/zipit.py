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


def zipit_dense(group, stats, *, reference: int, n: int, options: ZipItOptions, info: dict) -> list:
    state = stats.states[group.name]
    # the greedy matching is sequential: it runs on the host, whatever the statistics' device
    merge, unmerge = zipit_matrices(state.joint_correlation().cpu().numpy(), n, group.size, alpha=options.alpha,
                                    beta=options.beta)
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
