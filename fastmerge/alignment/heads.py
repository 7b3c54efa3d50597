"""Attention heads aligned from activations (fastmerge.spec.structure.HeadBlocks).

The tap of a heads group shows every head's output (the input of the output projection) as a
block of features. Heads are matched on their whole blocks: the similarity of reference head a
and head b of a model is the value of the best matching between their features (a small
assignment per pair), so a head is found whatever order its dims are in, and a linear assignment
on those values pairs the heads. Each nested group (a head's dims, the query heads sharing one
key/value head) is then matched inside every pair of matched heads the same way, on its own grid
level; levels matched before it line up, the others are matched as sets. A method with dense
transforms (CCA, ZipIt) transforms a nested group densely where its units are a whole block
level (per-head value/output dims), from the pair's covariance blocks.
"""

from __future__ import annotations

import math

import torch

from ..ops import linear_assignment
from ..ops.covariance import correlation_from_covariance
from ..spec.structure import HeadBlocks
from ..spec.transforms import Dense
from ..spec.types import Group
from .activation import permutation_matrices


def _match_value(block: torch.Tensor) -> torch.Tensor:
    """(P, P, R, R) similarities -> (P, P) mean value of the best matching of each R x R block."""
    p, q, r, _ = block.shape
    if r == 1:
        return block[..., 0, 0]
    flat = block.reshape(p * q, r, r)
    _, cols = linear_assignment(flat, maximize=True)  # one batched call: an assignment per pair
    return flat.gather(2, cols[:, :, None]).squeeze(-1).mean(-1).reshape(p, q)


def _level_cost(rho: torch.Tensor, level: int, decided: dict[int, torch.Tensor]) -> torch.Tensor:
    """The (size, size) similarity of the units of grid `level` inside one pair of blocks.

    rho: (grid..., grid...) correlations of the reference block's features (first half of the
    axes) with the model block's. Levels in `decided` (level -> permutation of the model's units)
    line up: only matched entries count, averaged; the remaining levels are matched as sets."""
    k = rho.dim() // 2
    grid = rho.shape[:k]
    for lvl, perm in decided.items():
        rho = rho.index_select(k + lvl, perm.to(rho.device))
    fixed = [lvl for lvl in range(k) if lvl != level and lvl in decided]
    free = [lvl for lvl in range(k) if lvl != level and lvl not in decided]
    order = [level, *fixed, *free]
    x = rho.permute(*order, *(k + lvl for lvl in order))
    n, d, r = grid[level], math.prod(grid[lvl] for lvl in fixed), math.prod(grid[lvl] for lvl in free)
    x = x.reshape(n, d, r, n, d, r)
    x = torch.diagonal(x, dim1=1, dim2=4).mean(-1)  # (n, r, n, r): decided levels matched
    return _match_value(x.permute(0, 2, 1, 3))


class _BlockStats:
    """The statistics of one group inside the heads, as a dense method reads a group's statistics:
    model j's units are the feature blocks `blocks[j]` (one head block: a nested group's instance;
    every head's block, summed in matched order: a group shared by all heads)."""

    def __init__(self, stats, flat: str, name: str, blocks: list[list[int]], width: int) -> None:
        self.stats, self.flat, self.name, self.blocks, self.width = stats, flat, name, blocks, width

    def covariance(self, group: str, i: int, j: int) -> torch.Tensor:
        full, w = self.stats.covariance(self.flat, i, j), self.width
        return sum(full[a * w: (a + 1) * w, b * w: (b + 1) * w] for a, b in zip(self.blocks[i], self.blocks[j]))

    def correlation(self, group: str, i: int, j: int) -> torch.Tensor:
        std_i = self.covariance(group, i, i).diagonal().clamp_min(0).sqrt()
        std_j = self.covariance(group, j, j).diagonal().clamp_min(0).sqrt()
        return correlation_from_covariance(self.covariance(group, i, j), std_i, std_j)

    def covariance_eigh(self, group: str, i: int):
        return torch.linalg.eigh(self.covariance(group, i, i).double())

    @property
    def states(self) -> dict:
        return {self.name: _BlockState(self)}


class _BlockState:
    """What ZipIt reads of a group's CovarianceState, for a _BlockStats view."""

    def __init__(self, view: _BlockStats) -> None:
        self.view = view
        self.count = view.stats.states[view.flat].count

    def joint_correlation(self) -> torch.Tensor:
        n = len(self.view.blocks)
        return torch.cat([torch.cat([self.view.correlation(self.view.name, i, j) for j in range(n)], dim=1)
                          for i in range(n)], dim=0)


def align_heads(blocks: HeadBlocks, stats, *, reference: int, n: int, dense=None, dense_options=None,
                info: dict) -> list[dict[str, object]]:
    """Per model, {group: transform} for the heads group and its nested tapped groups: (count, size)
    permutations, or Dense transforms of the nested groups `dense` (a method's dense function)
    moves exactly. Writes the matched values into `info` (per group name)."""
    grid = blocks.grid
    heads, width = grid[0], blocks.flat.size // grid[0]
    sub = grid[1:]
    out: list[dict[str, object]] = [{} for _ in range(n)]
    device = stats.states[blocks.flat.name].count.device
    # (ref head, feature, head, feature) correlations of each model with the reference, read once
    rhos = {i: stats.correlation(blocks.flat.name, reference, i).double().reshape(heads, width, heads, width)
            for i in range(n) if i != reference}
    head_perms: list[torch.Tensor] = []
    for i in range(n):
        if i == reference:
            head_perms.append(torch.arange(heads, device=device))
            continue
        cost = _match_value(rhos[i].permute(0, 2, 1, 3))  # (ref head, head, f, f)
        _, cols = linear_assignment(cost, maximize=True)
        head_perms.append(cols)
        info.setdefault(blocks.heads.name, {}).setdefault("matched_correlation", {})[i] = float(
            cost[torch.arange(heads, device=cost.device), cols].mean())
    for i in range(n):
        out[i][blocks.heads.name] = head_perms[i][None]
    # per model and head: the permutations of the levels inside the heads decided so far
    decided: list[list[dict[int, torch.Tensor]]] = [[{} for _ in range(heads)] for _ in range(n)]
    levels = [(g, lvl, False) for g, lvl in blocks.nested] + [(g, lvl, True) for g, lvl in blocks.shared]
    for group, level, shared in levels:
        per_model = []
        for i in range(n):
            count = 1 if shared else heads
            if i == reference:
                per_model.append(torch.arange(group.size, device=device).repeat(count, 1))
                continue
            costs = [_level_cost(rhos[i][a, :, head_perms[i][a], :].reshape(*sub, *sub), level - 1, decided[i][a])
                     for a in range(heads)]
            if shared:  # one permutation for every head: matched on all pairs of matched heads
                costs = [sum(costs) / heads]
            perms = torch.stack([linear_assignment(c, maximize=True)[1] for c in costs])
            per_model.append(perms)
            for a in range(heads):
                decided[i][a][level - 1] = perms[0 if shared else a]
        for i in range(n):
            out[i][group.name] = per_model[i]
        if dense is not None and len(sub) == 1 and all(m.role in ("out", "in") for m in group.members):
            _dense_inside(group, shared, blocks, stats, head_perms, per_model, reference=reference, n=n, dense=dense,
                          options=dense_options, out=out, info=info.setdefault(group.name, {}))
    return out


def _dense_inside(group: Group, shared: bool, blocks: HeadBlocks, stats, head_perms, perms, *, reference, n, dense,
                  options, out, info) -> None:
    """Dense transforms of a group whose units are a whole block level inside the heads: per head
    from the pair of matched heads' covariance blocks, or (shared) one for all heads from their sum."""
    heads, width = blocks.grid[0], blocks.flat.size // blocks.grid[0]
    single = Group(name=group.name, size=group.size, members=group.members)
    instances = [list(range(heads))] if shared else [[a] for a in range(heads)]
    per_instance = []
    for k, those in enumerate(instances):
        view = _BlockStats(stats, blocks.flat.name, group.name, [[int(p[a]) for a in those] for p in head_perms],
                           width)
        per_instance.append(dense(single, view, reference=reference, n=n, options=options, info={},
                                  perms=[p[k][None] for p in perms]))
    for i in range(n):
        mats = [per_instance[k][i] for k in range(len(instances))]
        if all(t is None for t in mats):
            continue
        fallback = permutation_matrices(perms[i])
        outs = torch.stack([t.out[0] if t is not None else fallback[a] for a, t in enumerate(mats)])
        inps = torch.stack([t.inp[0] if t is not None else fallback[a].T for a, t in enumerate(mats)])
        out[i][group.name] = Dense(out=outs, inp=inps)
    info["transform"] = "dense, one for all heads" if shared else "dense per head"
