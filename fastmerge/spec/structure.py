"""Views of a MergeSpec that statistics and alignment need: member unfolding, nesting, tap groups."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .types import Group, Member, MergeSpec, TapPoint


def unfold(tensor: torch.Tensor, member: Member, keep: int | None = None) -> torch.Tensor:
    """The member's units as rows: (count, size, rest), where rest runs over every replica level
    and every other axis of the tensor. With `keep` (a level of the member grid), that level is
    kept as its own axis: (count, size, size_keep, rest)."""
    w = member.cells(tensor, member.axis)  # selected grid levels, then the other axes flattened
    ndim = w.dim() - 1
    front = list(member.instance) + [member.unit] + ([keep] if keep is not None else [])
    rest = [j for j in range(ndim) if j not in front] + [ndim]
    w = w.permute(*front, *rest)
    count = math.prod(w.shape[: len(member.instance)])
    lead = (count, w.shape[len(member.instance)]) + ((w.shape[len(member.instance) + 1],) if keep is not None else ())
    return w.reshape(*lead, -1)


def nested_groups(spec: MergeSpec) -> dict[str, list[tuple[Group, dict]]]:
    """For each group G, the groups D instanced by G's unit level on a shared member axis (the
    dims of each head inside the heads group), with D's member per (tensor, axis, offset)."""
    index: dict[tuple, list[tuple[Group, Member]]] = {}
    for g in spec.groups:
        for m in g.members:
            index.setdefault((m.tensor, m.axis, m.offset, m.factors), []).append((g, m))
    nested: dict[str, list[tuple[Group, dict]]] = {g.name: [] for g in spec.groups}
    for entries in index.values():
        for g, m in entries:
            for d, dm in entries:
                if d is g or dm.unit <= m.unit or m.unit not in dm.instance:
                    continue
                found = next((pair for pair in nested[g.name] if pair[0] is d), None)
                if found is None:
                    found = (d, {})
                    nested[g.name].append(found)
                found[1][(m.tensor, m.axis, m.offset)] = dm
    return nested


def activation_groups(spec: MergeSpec, blocks: list[HeadBlocks] | None = None) -> list[Group]:
    """Groups that activation statistics can align on their own: a tap point, one instance, no
    group nested inside their units, and no head level among their samples (per-head dims shared by
    all heads are aligned with the heads: HeadBlocks.shared). `blocks`: head_blocks(spec), when the
    caller has them."""
    nested = nested_groups(spec)
    shared = {d.name for h in (head_blocks(spec) if blocks is None else blocks) for d, _ in h.shared}
    return [g for g in spec.groups if g.tap is not None and g.count == 1 and not nested[g.name]
            and g.name not in shared]


@dataclass(frozen=True)
class HeadBlocks:
    """Attention heads that activation statistics can align: the heads group (one instance) and
    the groups nested in it whose units the same tap shows (per-head dims, query heads of a
    key/value head), each with its level in the tap grid. `flat` is the statistics group: every
    feature of the tapped axis as one unit (heads x features per head)."""

    heads: Group
    flat: Group
    nested: tuple[tuple[Group, int], ...]
    # groups of one instance on a level inside the heads: the same transform for every head (the
    # value dims of attention whose heads share one permutation of them)
    shared: tuple[tuple[Group, int], ...] = ()

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(self.heads.tap.factors)


def head_blocks(spec: MergeSpec) -> list[HeadBlocks]:
    """Heads groups whose tap shows every head's features as a block of the tapped axis (the input
    of an output projection: per-head attention outputs), with their tapped nested groups."""
    nested = nested_groups(spec)
    out = []
    for g in spec.groups:
        tap = g.tap
        if (tap is None or g.count != 1 or not nested[g.name] or tap.factors is None or tap.unit != 0
                or tap.instance or tap.select or tap.offset or tap.factors[0] != g.size):
            continue
        def same_tap(d: Group) -> bool:
            t = d.tap
            return (t is not None and (t.module, t.kind, t.arg, t.dim, t.factors, t.offset) ==
                    (tap.module, tap.kind, tap.arg, tap.dim, tap.factors, tap.offset)
                    and not t.select and t.unit >= 1 and t.factors[t.unit] == d.size)

        inner = [(d, d.tap.unit) for d, _ in nested[g.name]
                 if same_tap(d) and d.tap.instance == (0,) and d.count == g.size]
        axes = {(m.tensor, m.axis) for m in g.members}
        shared = [(d, d.tap.unit) for d in spec.groups
                  if d is not g and d.count == 1 and same_tap(d) and not d.tap.instance
                  and any((m.tensor, m.axis) in axes for m in d.members)]
        flat = Group(name=f"{g.name}#features", size=math.prod(tap.factors), members=(),
                     tap=replace(tap, factors=None, unit=0))
        out.append(HeadBlocks(heads=g, flat=flat, nested=tuple(inner), shared=tuple(shared)))
    return out


def statistics_groups(spec: MergeSpec) -> list[Group]:
    """Every group activation statistics are collected for: the activation groups and the heads'
    feature groups."""
    blocks = head_blocks(spec)
    return activation_groups(spec, blocks) + [h.flat for h in blocks]


def stream_taps(spec: MergeSpec) -> dict[str, list[TapPoint]]:
    """More places to observe a residual stream: for each group that LayerNorms/RMSNorms over the
    last axis read (spec.norms), the output of every such norm, i.e. the stream at every layer and
    position as its readers see it (normalised per token). One tap shows one layer, often one
    token (a ViT's head reads the class token after the last block); the stream has one basis at
    every layer, so its statistics pool them all. The norm's module is its weight's (bias's) owner."""
    out: dict[str, list[TapPoint]] = {}
    for norm in spec.norms:
        tensor = norm.weight or norm.bias
        if tensor is None or "." not in tensor:
            continue
        # the norm's own vectors, or (canonical specs, where they are constants) its readers' inputs
        axes = {(tensor, 0)} | {(w, axis) for w, _, axis in norm.readers}
        group = next((g for g in spec.groups if g.count == 1 and g.tap is not None
                      and any((m.tensor, m.axis) in axes for m in g.members)), None)
        if group is not None:
            out.setdefault(group.name, []).append(TapPoint(module=tensor.rsplit(".", 1)[0], kind="output"))
    return out
