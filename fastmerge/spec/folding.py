"""BatchNorm folding: a Linear/Conv followed by an eval-mode BatchNorm is one affine map.

A dense transform T of a group is exact on producer rows and consumer columns, not on per-unit
BatchNorm parameters: BN(T z) != T BN(z). Folded, the pair is z -> A z + c with A = s W and
c = s (b - mean) + beta (s = gamma / sqrt(var + eps)), which T moves exactly (T A, T c), so CCA and
ZipIt can transform the groups of a BatchNorm network, and weight matching compares the maps the
layers compute rather than weights whose scale the BatchNorm divides away.

A folded state keeps every tensor of the model: A in the producer's weight, c in the BatchNorm's
bias (the producer's bias, if any, becomes 0), and the BatchNorm an identity (running mean 0,
running variance 1, weight sqrt(1 + eps)): in eval mode it computes what the original did.
`unfold_state` turns a transformed folded state back into an ordinary one: each BatchNorm gets the
moments its output has (mean beta, variance gamma^2, units independent) mapped through the
transform as scale and shift, and running statistics that keep the eval-mode map exact, so the
state also trains, resets and interpolates like the original.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch

from .transforms import Dense
from .types import MergeSpec, NormFold

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

    groups = [replace(g, members=tuple(replace(m, role="out") if m.tensor in bias and m.role == "param" else m
                                       for m in g.members if m.tensor not in constant))
              for g in spec.groups]
    return MergeSpec(groups=groups, fixed=list(spec.fixed), folds=list(spec.folds))


def fold_group(spec: MergeSpec, fold: NormFold) -> str | None:
    """The single-instance group whose units are the fold's BatchNorm channels (None: no group)."""
    bias = fold.tensor("bias")
    return next((g.name for g in spec.groups if g.count == 1 and any(m.tensor == bias and m.axis == 0
                                                                       for m in g.members)), None)


def mapped_moments(mean: torch.Tensor, cov: torch.Tensor, transform) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit (mean, std) in the transformed basis: through a (1, size) permutation (new unit u is old
    unit p[u]) or a Dense transform T (mean T mu, variance diag(T Sigma T^T)); None: as they are."""
    if transform is None:
        return mean, cov.diagonal().clamp_min(0).sqrt()
    if isinstance(transform, Dense):
        t = transform.out[0].to(device=cov.device, dtype=torch.float64)
        return t @ mean.double(), ((t @ cov.double()) * t).sum(1).clamp_min(0).sqrt()
    perm = transform[0].to(mean.device)
    return mean[perm], cov.diagonal()[perm].clamp_min(0).sqrt()


def unfold_state(spec: MergeSpec, folded: Mapping[str, torch.Tensor], original: Mapping[str, torch.Tensor],
                 transforms: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """An ordinary state from a folded (and transformed) one: each BatchNorm's scale and shift are
    its original output moments (mean beta, variance gamma^2) mapped by its group's transform
    (mu', sigma'), its running statistics mu' - c and sigma'^2 - eps, c the folded bias: eval mode
    computes exactly the folded state's map. `original`: the state before folding."""
    out = dict(folded)
    for f in foldable(spec, original):
        bn = norm_tensors(f)
        group = fold_group(spec, f)
        gamma, beta = original[bn["weight"]].double(), original[bn["bias"]].double()
        mean, std = mapped_moments(beta, torch.diag(gamma * gamma), transforms.get(group) if group else None)
        c = folded[bn["bias"]].double()
        like = {k: folded[name] for k, name in bn.items()}
        out[bn["weight"]] = std.to(like["weight"])
        out[bn["bias"]] = mean.to(like["bias"])
        out[bn["running_mean"]] = (mean - c).to(like["running_mean"])
        out[bn["running_var"]] = (std * std - f.eps).clamp_min(0).to(like["running_var"])
    return out
