"""Axis layouts: what each axis of a traced tensor is made of, in terms of index spaces.

An axis of size n is a list of factors (outer to inner, sizes multiplying to n; factors of size 1
are dropped):
    plain(space)            units of one space;
    family(members, index)  units of members[u], where u is the unit of space `index` that the
                            element belongs to (an index that lives on another factor, usually of
                            another axis: the dims of head u);
    replica(n)              copies made by expand/repeat: any transform is consistent with them;
    opaque(n)               not features (batch, sequence, spatial positions, inputs): a space
                            aligned with an opaque factor cannot move, so it is fixed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .spaces import Space, SpaceTable, find

Layout = list  # list[Factor]


@dataclass(eq=False)
class Factor:
    size: int
    space: Space | None = None
    members: list | None = None  # list[Space] for a family
    index: Space | None = None
    replica: bool = False

    @property
    def opaque(self) -> bool:
        return self.space is None and self.members is None and not self.replica

    def spaces(self) -> list[Space]:
        if self.space is not None:
            return [self.space]
        return list(self.members or [])


def plain(space: Space) -> Layout:
    return [Factor(space.size, space=space)] if space.size > 1 else []


def family(members: list[Space], index: Space) -> Layout:
    size = members[0].size if members else 1
    return [Factor(size, members=list(members), index=index)] if size > 1 else []


def opaque(n: int) -> Layout:
    return [Factor(n)] if n > 1 else []


def replica(n: int) -> Layout:
    return [Factor(n, replica=True)] if n > 1 else []


def size_of(layout: Layout) -> int:
    return math.prod(f.size for f in layout)


def fix_layout(table: SpaceTable, layout: Layout, why: str) -> None:
    for f in layout:
        for s in f.spaces():
            table.fix(s, why)


def split_factor(table: SpaceTable, f: Factor, n: int, why: str) -> tuple[Layout, Layout] | None:
    """Splits factor f into a prefix of size n and the rest, refining its space if needed."""
    if f.size % n:
        return None
    if f.opaque:
        return opaque(n), opaque(f.size // n)
    if f.replica:
        return replica(n), replica(f.size // n)
    if f.space is not None:
        root = find(f.space)
        if root.struct is not None and root.struct[0] == "prod":
            outer, inners = root.struct[1], root.struct[2]
            if outer.size == n:
                return plain(outer), family(inners, outer)
            if n % outer.size == 0:  # the prefix reaches into the blocks
                rest = family(inners, outer)
                if not rest:
                    return None
                sub = split_factor(table, rest[0], n // outer.size, why)
                return None if sub is None else (plain(outer) + sub[0], sub[1])
            if outer.size % n == 0:  # the prefix is part of the block index
                sub = split_factor(table, Factor(outer.size, space=outer), n, why)
                return None if sub is None else (sub[0], sub[1] + family(inners, outer))
            return None
        made = table.split(root, n, why)
        if made is None:
            return None
        outer, inners = made
        return plain(outer), family(inners, outer)
    # A family: every member splits into (outer_u, inners_u). The outers form a family indexed
    # like f; the inners are indexed by the pair (unit of f's index, unit of outer_u), which is
    # itself a space: the product of f's index with the outers.
    splits = [table.split(m, n, why) for m in f.members]
    if any(s is None for s in splits):
        return None
    outers = [s[0] for s in splits]
    pairs = table.new(f.index.size * n)
    pairs.struct = ("prod", f.index, outers)
    return family(outers, f.index), family([b for s in splits for b in s[1]], pairs)


def unify_factors(table: SpaceTable, f: Factor, g: Factor, why: str) -> Factor:
    """f and g hold the same elements: unify their spaces; returns the factor the result keeps."""
    if f.replica:
        return g
    if g.replica:
        return f
    if f.opaque or g.opaque:
        for s in f.spaces() + g.spaces():
            table.fix(s, f"{why} (aligned with a non-feature axis)")
        return f if f.opaque else g
    if f.space is not None and g.space is not None:
        table.unify(f.space, g.space, why)
    elif f.space is not None or g.space is not None:
        single, fam = (f, g) if f.space is not None else (g, f)
        for m in fam.members:  # one space for every instance: the family is shared
            table.unify(single.space, m, why)
    elif len(f.members) == len(g.members):
        table.unify(f.index, g.index, why)
        for a, b in zip(f.members, g.members):
            table.unify(a, b, why)
    elif _refines(g.index, f.index) or _refines(f.index, g.index):
        # one family is indexed by blocks (u, v) of the other's index u: member u of the coarse
        # family holds the same units as every member (u, v) of the fine one (K/V heads shared
        # by several query heads)
        coarse, fine = (f, g) if _refines(g.index, f.index) else (g, f)
        per = len(fine.members) // len(coarse.members)
        for u, a in enumerate(coarse.members):
            for b in fine.members[u * per : (u + 1) * per]:
                table.unify(a, b, why)
    else:
        everything = f.members + g.members
        for m in everything[1:]:
            table.unify(everything[0], m, why)
    return f


def _refines(fine: Space, coarse: Space) -> bool:
    """fine is a product whose outer is coarse: its units are (unit of coarse, sub-unit)."""
    r = find(fine)
    return r.struct is not None and r.struct[0] == "prod" and find(r.struct[1]) is find(coarse)


def unify_layouts(table: SpaceTable, a: Layout, b: Layout, why: str) -> Layout:
    """Two layouts of the same axis (same total size): unify factor by factor, splitting factors
    to common boundaries. Returns the merged layout. On a structure that cannot be aligned, all
    spaces involved are fixed and an opaque layout is returned."""
    if size_of(a) != size_of(b):
        fix_layout(table, a + b, f"{why}: axes of different sizes")
        return opaque(max(size_of(a), size_of(b)))
    qa, qb, out = list(a), list(b), []
    while qa and qb:
        f, g = qa.pop(0), qb.pop(0)
        if f.size == g.size:
            out.append(unify_factors(table, f, g, why))
            continue
        big, small, queue = (f, g, qa) if f.size > g.size else (g, f, qb)
        parts = split_factor(table, big, small.size, why)
        if parts is None:
            fix_layout(table, [f, g] + qa + qb, f"{why}: axis structures that do not align")
            return opaque(size_of(a))
        head, rest = parts
        queue[:0] = head + rest
        if f.size > g.size:
            qb.insert(0, g)
        else:
            qa.insert(0, f)
    return out


def reshape_layout(table: SpaceTable, dims: list[Layout], new_shape: list[int], why: str) -> list[Layout] | None:
    """Regroups the factors of all axes into axes of `new_shape` (view/reshape/flatten), splitting
    factors where an axis boundary falls inside one. None when a boundary cannot be placed."""
    queue = [f for d in dims for f in d]
    out = []
    for n in new_shape:
        axis, need = [], n
        while need > 1:
            if not queue:
                return None
            f = queue.pop(0)
            if f.size <= need and need % f.size == 0:
                axis.append(f)
                need //= f.size
                continue
            parts = split_factor(table, f, need, why) if f.size % need == 0 else None
            if parts is None:
                return None
            head, rest = parts
            queue[:0] = head + rest
        out.append(axis)
    return out if not queue else None


def present(dims: list[Layout]) -> set[int]:
    """Root ids of the spaces that some plain factor of the tensor holds."""
    ids = set()
    for d in dims:
        for f in d:
            if f.space is not None:
                r = find(f.space)
                ids.add(r.uid)
    return ids


def prune_families(table: SpaceTable, dims: list[Layout], why: str, present_in: list[Layout] | None = None) -> list[Layout]:
    """A family whose index space is no longer an axis of the tensor (reduced, contracted or
    selected away) mixes its instances: they must share one transform. Replace it by a plain
    factor of the unified members. `present_in`: look for the index there instead."""
    ids = present(dims if present_in is None else present_in)
    out = []
    for d in dims:
        new = []
        for f in d:
            if f.members is not None and not _index_present(f.index, ids):
                for m in f.members[1:]:
                    table.unify(f.members[0], m, why)
                new.append(Factor(f.size, space=f.members[0]))
            else:
                new.append(f)
        out.append(new)
    return out


def _index_present(index: Space, ids: set[int]) -> bool:
    r = find(index)
    if r.uid in ids:
        return True
    # the index may have been refined into outer x inner factors that the tensor holds
    return r.struct is not None and r.struct[0] == "prod" and find(r.struct[1]).uid in ids
