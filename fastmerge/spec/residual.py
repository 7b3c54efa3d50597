"""The residual stream of a pre-norm transformer in a form that orthogonal transforms move exactly.

A dense transform T of a group is exact on producer rows and consumer columns, not through a
LayerNorm/RMSNorm: norm(T x) != T norm(x). Two function-preserving rewrites remove that obstacle
for an orthogonal T (the *canonical form*; no published merge method uses it):

- each stream norm's scale moves into the Linear layers that read it (spec.norms:
  W <- W diag(gamma)), and its shift into their biases (b <- b + W beta; the norm keeps weight 1
  and bias 0). A reader without a bias (an LM head) cannot take the shift: the norm then keeps
  beta / gamma as its bias, a vector in the stream's basis after the normalisation, which a
  transform moves like a producer row (Q c). A bare RMSNorm, x / rms(x), commutes with every
  orthogonal Q (rms(Q x) = rms(x));
- a LayerNorm first subtracts the mean of x's units. When every tensor that writes the stream
  (embeddings, output projections: the group's producer rows and per-unit parameters) writes
  mean-free vectors, the stream is mean-free everywhere and the subtraction does nothing; a
  mean-free stream stays mean-free under every orthogonal Q with Q 1 = 1, and the bare LayerNorm
  then commutes with such Q.

A canonical state has the model's own tensors (LayerNorms with weight 1 and bias 0 are ordinary
LayerNorms), so it loads into the model and its merges are ordinary checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from .types import Group, MergeSpec, StreamNorm


@dataclass(frozen=True)
class ResidualGroup:
    """A group that passes through stream norms: `kind` "rms" (any orthogonal transform is exact
    on the canonical form) or "layer" (orthogonal transforms that fix the all-ones vector)."""

    name: str
    kind: str
    norms: tuple[StreamNorm, ...]


def _reader_group(spec: MergeSpec, norm: StreamNorm) -> Group | None:
    weight, _, axis = norm.readers[0]
    return next((g for g in spec.groups if g.count == 1 and any(
        m.tensor == weight and m.axis == axis and m.role == "in" for m in g.members)), None)


def residual_groups(spec: MergeSpec) -> tuple[dict[str, ResidualGroup], dict[str, str]]:
    """({group: ResidualGroup} for every group the canonical form lets an orthogonal transform
    move exactly, {group: why not} for groups that pass through norms but cannot be made so)."""
    norms_of: dict[str, list[StreamNorm]] = {}
    refused: dict[str, str] = {}
    for norm in spec.norms:
        if norm.obstacle:
            group = next((g for g in spec.groups if g.count == 1 and any(
                m.tensor in (norm.weight, norm.bias) and m.axis == 0 for m in g.members)), None)
            if group is not None:
                refused.setdefault(group.name, f"{norm.weight or norm.bias}: {norm.obstacle}")
            continue
        group = _reader_group(spec, norm)
        if group is None:
            continue
        norms_of.setdefault(group.name, []).append(norm)
    found = {}
    for name, norms in norms_of.items():
        if name in refused:
            continue
        group = spec.group(name)
        why = _obstacle(group, norms)
        if why:
            refused[name] = why
            continue
        kind = "layer" if any(n.kind == "layer" for n in norms) else "rms"
        found[name] = ResidualGroup(name, kind, tuple(norms))
    return found, refused


def folds_shift(norm: StreamNorm) -> bool:
    """Whether the norm's shift goes into its readers' biases (all have one), else it stays."""
    return norm.bias is not None and all(b is not None for _, b, _ in norm.readers)


def _obstacle(group: Group, norms: list[StreamNorm]) -> str:
    """Why the canonical form would not make `group` exact under orthogonal transforms ("" if it does)."""
    own = {n for norm in norms for n in (norm.weight, norm.bias) if n}
    readers = {(w, axis) for norm in norms for w, _, axis in norm.readers}
    for m in group.members:
        if m.role == "gate":
            return f"{m.tensor} is a factor of an elementwise product"
        if m.factors is not None or m.offset or m.select:
            return f"{m.tensor} holds the units in part of an axis"
        if m.role == "param" and m.tensor not in own:
            if not any(norm.kind == "layer" for norm in norms):
                return f"{m.tensor} is a per-unit parameter outside the norms"
    if any(n.kind == "layer" for n in norms):
        raw = [m.tensor for m in group.members if m.role == "in" and (m.tensor, m.axis) not in readers]
        if raw:  # a mean-free stream would change what they compute
            return f"{raw[0]} reads the stream without a LayerNorm in between"
    return ""


def _constant(groups: Mapping[str, ResidualGroup]) -> set[str]:
    """The norm tensors a canonical state holds at 1 (scales) or 0 (folded shifts)."""
    return {n for g in groups.values() for norm in g.norms
            for n in (norm.weight, norm.bias if folds_shift(norm) else None) if n}


def canonical_spec(spec: MergeSpec, groups: Mapping[str, ResidualGroup]) -> MergeSpec:
    """The spec of canonical states: the norms' scales and folded shifts are constants (1 and 0)
    and leave the groups; a shift the norm keeps is a vector of the stream (role "out")."""
    constant = _constant(groups)
    kept = {norm.bias for g in groups.values() for norm in g.norms if norm.bias and not folds_shift(norm)}
    out = [replace(g, members=tuple(replace(m, role="out") if m.tensor in kept else m
                                    for m in g.members if m.tensor not in constant)) for g in spec.groups]
    return MergeSpec(groups=out, fixed=list(spec.fixed), folds=list(spec.folds), norms=list(spec.norms))


def canonical_state(spec: MergeSpec, state: Mapping[str, torch.Tensor],
                    groups: Mapping[str, ResidualGroup]) -> dict[str, torch.Tensor]:
    """A new state computing the same function in canonical form (module docstring) for `groups`;
    computed in float64, stored in each tensor's dtype. `state` is unchanged."""
    out = dict(state)
    for residual in groups.values():
        for norm in residual.norms:
            gamma = state[norm.weight].double() if norm.weight else None
            beta = state[norm.bias].double() if norm.bias else None
            shift = folds_shift(norm)
            for weight, bias, axis in norm.readers:
                w = state[weight].double()
                if shift:  # b <- b + W beta (before W takes gamma)
                    out[bias] = (state[bias].double() + (w @ beta if axis == 1 else beta @ w)).to(state[bias].dtype)
                if gamma is not None:
                    w = w * (gamma[None, :] if axis == 1 else gamma[:, None])
                out[weight] = w.to(state[weight].dtype)
            if norm.weight:
                out[norm.weight] = torch.ones_like(state[norm.weight])
            if norm.bias:  # 0, or the shift before the scale: beta / gamma (a zero scale with a shift is not
                # exact: the first batch's check refuses it; a zero scale without one keeps 0, not 0/0)
                kept = beta if gamma is None else torch.where(beta == 0, 0.0, beta / gamma)
                out[norm.bias] = torch.zeros_like(state[norm.bias]) if shift else kept.to(state[norm.bias].dtype)
        if residual.kind == "layer":
            norm_tensors = {n for norm in residual.norms for n in (norm.weight, norm.bias) if n}
            for m in spec.group(residual.name).members:
                if m.role != "in" and m.tensor not in norm_tensors:  # every writer of the stream: mean-free
                    t = out[m.tensor].double()
                    out[m.tensor] = (t - t.mean(dim=m.axis, keepdim=True)).to(state[m.tensor].dtype)
    return out


def ones_complement(size: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """(size, size - 1) orthonormal basis of the vectors whose entries sum to 0."""
    ones = torch.ones(size, 1, dtype=dtype, device=device) / size**0.5
    q, _ = torch.linalg.qr(torch.cat([ones, torch.eye(size, dtype=dtype, device=device)[:, : size - 1]], dim=1))
    return q[:, 1:]
