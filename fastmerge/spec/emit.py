"""From unified index spaces to a MergeSpec: groups, members, instances and tap points.

Each member axis (a parameter/buffer axis) is expanded through the structure of its space into a
row-major grid of levels (e.g. heads x dims); each level holds, for every value of the levels
before it, one leaf space. Leaves that are free (not fixed) become group units. Leaves that
differ along a *permutable* outer level (one block per head) are instances of one group; along a
fixed outer level (the q/k/v thirds of a fused projection) they belong to different groups.
Whatever cannot be described this way is left out (fixed) with a warning, never guessed.
"""

from __future__ import annotations

import warnings

import numpy as np

from .layout import plain, size_of, unify_layouts
from .spaces import Space, find
from .trace_types import TraceResult
from .types import Group, MergeSpec, Member, TapPoint

Levels = list  # list[(size, np.ndarray of Space, shape = sizes of the levels before)]


def expand(space: Space) -> list[tuple[int, Levels]] | None:
    """Segments (offset, levels) of a space, or None for a structure a grid cannot express."""
    r = find(space)
    if r.fixed or r.struct is None:
        cell = np.empty((), dtype=object)
        cell[()] = r
        return [(0, [(r.size, cell)])]
    if r.struct[0] == "sum":
        segments, offset = [], 0
        for part in r.struct[1]:
            sub = expand(part)
            if sub is None:
                return None
            segments += [(offset + o, levels) for o, levels in sub]
            offset += find(part).size
        return segments
    outer, inners = r.struct[1], r.struct[2]
    expanded_outer = expand(outer)
    expanded_inner = [expand(b) for b in inners]
    if expanded_outer is None or len(expanded_outer) != 1:
        return None
    if any(e is None or len(e) != 1 for e in expanded_inner):
        return None
    inner_levels = [e[0][1] for e in expanded_inner]
    sizes = [n for n, _ in inner_levels[0]]
    if any([n for n, _ in lv] != sizes for lv in inner_levels):
        return None  # heads whose dims are structured differently
    outer_levels = expanded_outer[0][1]
    outer_shape = tuple(n for n, _ in outer_levels)
    levels = list(outer_levels)
    for k, n in enumerate(sizes):
        stacked = np.empty((len(inners),) + inner_levels[0][k][1].shape, dtype=object)
        for u, lv in enumerate(inner_levels):
            stacked[u, ...] = lv[k][1]
        levels.append((n, stacked.reshape(outer_shape + stacked.shape[1:])))
    return [(0, levels)]


def _free(s: Space) -> bool:
    r = find(s)
    return not r.fixed and r.struct is None and r.size >= 2


def _uids(table: np.ndarray) -> np.ndarray:
    out = np.empty(table.shape, dtype=np.int64)
    for idx, s in np.ndenumerate(table):
        r = find(s)
        out[idx] = r.uid if (not r.fixed and r.struct is None and r.size >= 2) else -1
    return out


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


class _Occurrence:
    """One level of one segment of a member (or tap) axis."""

    def __init__(self, owner: int, offset: int, levels: Levels, k: int) -> None:
        self.owner, self.offset, self.k = owner, offset, k
        self.sizes = tuple(n for n, _ in levels)
        self.uids = _uids(levels[k][1])
        # outer levels whose units can be permuted: instances may vary along them
        self.permutable = [bool((_uids(levels[j][1]) >= 0).all()) for j in range(k)]

    def layout(self, comp_of, comp: int):
        """(instance levels, select, instance uid order) of component `comp` here, or None when
        this occurrence does not follow a regular pattern."""
        mask = np.vectorize(lambda u: u >= 0 and comp_of(u) == comp, otypes=[bool])(self.uids) \
            if self.uids.size else np.zeros(self.uids.shape, dtype=bool)
        if not mask.any():
            return None
        k = self.k
        selected = []
        for j in range(k):
            others = tuple(i for i in range(k) if i != j)
            selected.append(mask.any(axis=others) if others else mask.copy())
        full = np.ones((), dtype=bool)
        for j in range(k):
            shape = [1] * k
            shape[j] = self.sizes[j]
            full = full & selected[j].reshape(shape)
        if k and not np.array_equal(np.broadcast_to(full, mask.shape), mask):
            return "irregular"
        sub = self.uids[np.ix_(*selected)] if k else self.uids
        instance = []
        for j in range(k):
            lines = np.moveaxis(sub, j, -1).reshape(-1, sub.shape[j])
            constant = (lines == lines[:, :1]).all()
            if constant:
                continue
            distinct = all(len(set(line.tolist())) == len(line) for line in lines)
            if not distinct or not self.permutable[j]:
                return "irregular"
            instance.append(j)
        select = tuple((j, tuple(int(v) for v in np.nonzero(selected[j])[0])) for j in range(k)
                       if not selected[j].all())
        if any(self.permutable[j] for j, _ in select):
            return "irregular"
        index = tuple(0 if j not in instance else slice(None) for j in range(k))
        order = sub[index].reshape(-1).tolist() if k else [int(sub)]
        return tuple(instance), select, order


def build_spec(result: TraceResult, shapes: dict) -> MergeSpec:
    members = result.members
    expansions = []
    problems: list[str] = []
    for tensor, axis, space in members:
        segs = expand(space)
        if segs is None:
            problems.append(f"{tensor}:{axis}")
            result.table.fix(space, "structure a member grid cannot express")
            segs = expand(space)
        expansions.append(segs)

    # taps: a fresh space laid out like the observed axis, expanded the same way
    tap_expansions = []
    for tap in result.taps:
        probe = result.table.new(size_of(tap.layout)) if tap.layout else None
        if probe is None:
            tap_expansions.append(None)
            continue
        unify_layouts(result.table, plain(probe), tap.layout, f"tap {tap.module}")
        tap_expansions.append(expand(probe))

    occurrences = [_Occurrence(mi, off, levels, k) for mi, segs in enumerate(expansions)
                   for off, levels in segs for k in range(len(levels))]

    # instances: leaves that differ along a permutable outer level belong to one group
    families = _UnionFind()
    irregular: set[int] = set()
    for occ in occurrences:
        for u in occ.uids.reshape(-1):
            if u >= 0:
                families.find(int(u))
        for j in range(occ.k):
            if not occ.permutable[j]:
                continue
            lines = np.moveaxis(occ.uids, j, -1).reshape(-1, occ.sizes[j])
            for line in lines:
                vals = [int(v) for v in line if v >= 0]
                if len(vals) != len(line) or len(set(vals)) == 1:
                    continue
                if len(set(vals)) == len(vals):
                    for v in vals[1:]:
                        families.union(vals[0], v)
                else:
                    irregular.update(vals)

    by_comp: dict[int, list[_Occurrence]] = {}
    for occ in occurrences:
        for comp in {families.find(int(u)) for u in occ.uids.reshape(-1) if u >= 0}:
            by_comp.setdefault(comp, []).append(occ)

    groups, dropped = [], []
    for comp, occs in by_comp.items():
        built = _build_group(comp, occs, families, members, result.roles, irregular)
        if built is None:
            dropped.append(comp)
        else:
            groups.append(built)
    if dropped or problems:
        warnings.warn(
            f"fastmerge.trace_spec: {len(dropped) + len(problems)} groups with an irregular structure were left out",
            stacklevel=3,
        )

    tap_sizes = [size_of(tap.layout) if tap.layout else None for tap in result.taps]
    tap_occurrences = [(i, _Occurrence(-1 - i, off, levels, k)) for i, segs in enumerate(tap_expansions) if segs
                       for off, levels in segs for k in range(len(levels))]
    finished = []
    for order, (comp, group_members, size, count, uid_order, first_level) in enumerate(groups):
        tap = _choose_tap(comp, uid_order, tap_occurrences, result.taps, families, tap_sizes)
        finished.append((first_level, order, comp, group_members, size, count, tap))
    finished.sort(key=lambda g: (g[0], g[1]))

    spec_groups, used = [], set()
    for _, _, comp, group_members, size, count, tap in finished:
        name = _unique(_name(group_members, count), used)
        spec_groups.append(Group(name=name, size=size, count=count, members=tuple(group_members), tap=tap))
    fixed = []
    for (tensor, axis, space), segs in zip(members, expansions):
        if not any(u >= 0 for _, levels in segs for _, tab in levels for u in _uids(tab).reshape(-1)):
            fixed.append((tensor, axis, find(space).why or "not tied to a permutable group"))
    spec = MergeSpec(groups=spec_groups, fixed=fixed, folds=list(result.folds), norms=list(result.norms))
    spec.validate(shapes)  # the tracer's own output must fit the model
    return spec


def _build_group(comp, occs, families, members, roles, irregular):
    comp_of = families.find
    group_members, uid_order, size, first_level = [], None, None, None
    seen = set()
    for occ in occs:
        layout = occ.layout(comp_of, comp)
        if layout is None:
            continue
        if layout == "irregular":
            return None
        instance, select, order = layout
        if uid_order is None:
            uid_order = order
        elif order != uid_order:
            return None
        if any(u in irregular for u in order):
            return None
        tensor, axis, _ = members[occ.owner]
        size = occ.sizes[occ.k]
        grid = None if (len(occ.sizes) == 1 and occ.offset == 0 and occ.sizes[0] == shapes_axis(members, occ)) \
            else occ.sizes
        member_roles = roles.get((tensor, axis), set())
        role = ("gate" if "gate" in member_roles else "out" if "out" in member_roles
                else "in" if "in" in member_roles else "param")
        m = Member(tensor, axis, role=role, factors=grid, unit=occ.k, instance=instance, select=select,
                   offset=occ.offset)
        if m not in seen:
            seen.add(m)
            group_members.append(m)
        first_level = occ.k if first_level is None else min(first_level, occ.k)
    if not group_members:
        return None
    return comp, group_members, size, len(uid_order), uid_order, first_level


def shapes_axis(members, occ) -> int:
    """Total size of the member axis an occurrence belongs to (sum of its segments)."""
    return find(members[occ.owner][2]).size


def _choose_tap(comp, uid_order, tap_occurrences, taps, families, tap_sizes):
    """The tap that observes group `comp` best; a group that fills only part of the tapped axis
    (one input of a concatenation) is observed on its slice of it (offset and grid)."""
    best = None
    for i, occ in tap_occurrences:
        layout = occ.layout(families.find, comp)
        if layout is None or layout == "irregular" or layout[2] != uid_order:
            continue
        instance, select, _ = layout
        cand = taps[i]
        whole = len(occ.sizes) == 1 and occ.offset == 0 and occ.sizes[0] == tap_sizes[i]
        key = (cand.preference, 0 if whole else 1, -cand.order)
        if best is None or key < best[0]:
            grid = None if whole else occ.sizes
            best = (key, TapPoint(module=cand.module, kind=cand.kind, arg=0, dim=cand.dim, factors=grid, unit=occ.k,
                                  instance=instance, select=select, offset=occ.offset))
    return best[1] if best else None


def _module(tensor: str) -> str:
    return tensor.rsplit(".", 1)[0] if "." in tensor else tensor


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    prefix = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        prefix.append(level[0])
    return ".".join(prefix)


def _name(group_members: list[Member], count: int) -> str:
    outs = list(dict.fromkeys(_module(m.tensor) for m in group_members if m.role in ("out", "gate")))
    if len(outs) <= 1:
        first = next((m for m in group_members if m.role in ("out", "gate")), group_members[0])
        base = _module(first.tensor) + (f"@{first.offset}" if first.offset else "")
    else:
        prefix = _common_prefix(outs)
        base = prefix if prefix else f"stream:{outs[0]}"
    first = group_members[0]
    if first.factors is not None and first.unit < len(first.factors) - 1 and count == 1:
        base += ".blocks"
    if count > 1:
        base += f"[x{count}]"
    return base


def _unique(name: str, used: set) -> str:
    candidate, i = name, 2
    while candidate in used:
        candidate, i = f"{name}#{i}", i + 1
    used.add(candidate)
    return candidate


__all__ = ["build_spec", "expand"]
