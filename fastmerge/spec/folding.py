"""BatchNorm folding: a Linear/Conv followed by an eval-mode BatchNorm is one affine map.

A dense transform T of a group is exact on producer rows and consumer columns, not on per-unit
BatchNorm parameters: BN(T z) != T BN(z). Folded, the pair is z -> A z + c with A = s W and
c = s (b - mean) + beta (s = gamma / sqrt(var + eps)), which T moves exactly (T A, T c), so CCA and
ZipIt can transform the groups of a BatchNorm network, and weight matching compares the maps the
layers compute rather than weights whose scale the BatchNorm divides away.

A folded state keeps every tensor of the model: A in the producer's weight, c in the BatchNorm's
bias (the producer's bias, if any, becomes 0), and the BatchNorm an identity (running mean 0,
running variance 1, weight sqrt(1 + eps)): in eval mode it computes what the original did. After
a merge the BatchNorms get their scale and shift back from the parents' statistics
(fastmerge.merging.repair).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .types import Group, Member, MergeSpec, NormFold

_CONSTANT = ("weight", "running_mean", "running_var")  # identity after folding: no transform moves them


def norm_tensors(fold: NormFold) -> dict[str, str]:
    return {what: fold.tensor(what) for what in ("weight", "bias", "running_mean", "running_var")}


def foldable(spec: MergeSpec, state: Mapping[str, torch.Tensor]) -> list[NormFold]:
    """The spec's folds whose tensors the state holds (floating point)."""
    out = []
    for f in spec.folds:
        names = [f.producer, *norm_tensors(f).values(), *([f.producer_bias] if f.producer_bias else [])]
        if all(n in state and state[n].is_floating_point() for n in names):
            out.append(f)
    return out


def fold_state(spec: MergeSpec, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new state dict with every BatchNorm of the spec's folds folded into its producer (the
    module docstring); computed in float64, stored in each tensor's dtype. `state` is unchanged."""
    out = dict(state)
    for f in foldable(spec, state):
        bn = norm_tensors(f)
        w = state[f.producer]
        gamma, beta = state[bn["weight"]].double(), state[bn["bias"]].double()
        mean, var = state[bn["running_mean"]].double(), state[bn["running_var"]].double()
        scale = gamma / (var + f.eps).sqrt()
        bias = state[f.producer_bias].double() if f.producer_bias else torch.zeros_like(mean)
        out[f.producer] = (w.double() * scale.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype)
        if f.producer_bias:
            out[f.producer_bias] = torch.zeros_like(state[f.producer_bias])
        out[bn["bias"]] = (scale * (bias - mean) + beta).to(state[bn["bias"]].dtype)
        out[bn["running_mean"]] = torch.zeros_like(state[bn["running_mean"]])
        out[bn["running_var"]] = torch.ones_like(state[bn["running_var"]])
        out[bn["weight"]] = torch.full_like(state[bn["weight"]], (1.0 + f.eps) ** 0.5)
    return out


def folded_spec(spec: MergeSpec) -> MergeSpec:
    """The spec of folded states: a folded BatchNorm's bias is a producer row (role "out": c <- T c)
    and its constant tensors leave the groups; a group may then take a dense transform."""
    constant, bias = set(), set()
    for f in spec.folds:
        bias.add(f.tensor("bias"))
        constant.update(f.tensor(w) for w in _CONSTANT)

    def member(m: Member) -> Member:
        if m.tensor in bias and m.role == "param":
            return Member(m.tensor, m.axis, "out", m.factors, m.unit, m.instance, m.select, m.offset)
        return m

    groups = [Group(g.name, g.size, tuple(member(m) for m in g.members if m.tensor not in constant), g.count, g.tap)
              for g in spec.groups]
    return MergeSpec(groups=groups, fixed=list(spec.fixed), folds=list(spec.folds))
