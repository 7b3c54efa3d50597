"""Index spaces: the units that must be permuted together, found by unification.

Every weight axis starts as a fresh *space* (a set of n units). Tracing the model unifies spaces
that must receive the same transform (a Linear's output rows and the next Linear's input
columns; both operands of a residual add), refines them when a reshape splits an axis (a
projection's D outputs become H heads x d dims: a *product* space), or a slice cuts it (a *sum*
space), and *fixes* them when an operation cannot commute with a permutation (model inputs and
outputs, unknown ops, select of one index).

Structures:
    product(outer, inners): units (a, b) with a in outer and b in inners[a]; a permutation of
        `outer` moves whole blocks, and each block a has its own permutation of inners[a]
        (attention heads and the dims of each head). Inners unified with each other are shared.
    sum(parts): consecutive segments, each permuted on its own (a fused projection split in two).
"""

from __future__ import annotations

from typing import Optional


class Space:
    """One node of the union-find. Only the representative (find) carries meaning."""

    __slots__ = ("parent", "size", "struct", "fixed", "why", "uid")

    def __init__(self, size: int, uid: int) -> None:
        self.parent: Optional[Space] = None
        self.size = size
        self.struct: Optional[tuple] = None  # ("prod", outer, inners) | ("sum", parts)
        self.fixed = False
        self.why = ""
        self.uid = uid

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        root = find(self)
        kind = root.struct[0] if root.struct else ("fixed" if root.fixed else "atomic")
        return f"Space#{root.uid}({root.size}, {kind})"


def find(s: Space) -> Space:
    root = s
    while root.parent is not None:
        root = root.parent
    while s.parent is not None:  # path compression
        s.parent, s = root, s.parent
    return root


def children(s: Space) -> list[Space]:
    if s.struct is None:
        return []
    if s.struct[0] == "prod":
        return [s.struct[1], *s.struct[2]]
    return list(s.struct[1])


class SpaceTable:
    """Creates spaces and applies the unification rules; remembers why spaces were fixed."""

    def __init__(self) -> None:
        self._count = 0

    def new(self, size: int, *, fixed: bool = False, why: str = "") -> Space:
        self._count += 1
        s = Space(size, self._count)
        s.fixed, s.why = fixed, why
        return s

    def fix(self, s: Space, why: str) -> None:
        """No transform may touch these units (nor the units of any sub-space)."""
        stack = [find(s)]
        while stack:
            r = find(stack.pop())
            if r.fixed:
                continue
            r.fixed, r.why = True, why
            stack.extend(children(r))

    def unify(self, a: Space, b: Space, why: str = "") -> None:
        """a and b must receive the same transform."""
        a, b = find(a), find(b)
        if a is b:
            return
        if a.size != b.size:
            self.fix(a, f"size mismatch {a.size} vs {b.size} at {why}")
            self.fix(b, f"size mismatch {a.size} vs {b.size} at {why}")
            b.parent = a
            return
        if a.fixed or b.fixed:
            reason = a.why or b.why
            self.fix(a, reason)
            self.fix(b, reason)
            b.parent = a
            return
        if a.struct is None:
            a.parent = b
            return
        if b.struct is None:
            b.parent = a
            return
        sa, sb = a.struct, b.struct
        if sa[0] == sb[0] == "prod" and sa[1].size == sb[1].size:
            b.parent = a  # a keeps its structure; b's children are unified into a's
            self.unify(sa[1], sb[1], why)
            for x, y in zip(sa[2], sb[2]):
                self.unify(x, y, why)
        elif sa[0] == sb[0] == "sum" and [p.size for p in sa[1]] == [p.size for p in sb[1]]:
            b.parent = a
            for x, y in zip(sa[1], sb[1]):
                self.unify(x, y, why)
        else:  # two incompatible refinements of the same units: neither can move
            reason = f"incompatible structures of one space at {why}"
            self.fix(a, reason)
            self.fix(b, reason)
            b.parent = a

    def split(self, s: Space, outer_size: int, why: str = "") -> Optional[tuple[Space, list[Space]]]:
        """Views s as `outer_size` consecutive blocks: returns (outer, inners), where inners[b] is
        the space of block b. Refines s's structure as needed; None when a block boundary cannot
        be expressed (the caller then fixes the spaces involved)."""
        s = find(s)
        if outer_size < 1 or s.size % outer_size:
            return None
        inner_size = s.size // outer_size
        if outer_size == s.size:  # blocks of one unit: s itself indexes them
            return s, [self.new(1) for _ in range(outer_size)]
        if outer_size == 1:
            return self.new(1), [s]
        if s.struct is None:
            outer = self.new(outer_size, fixed=s.fixed, why=s.why)
            inners = [self.new(inner_size, fixed=s.fixed, why=s.why) for _ in range(outer_size)]
            s.struct = ("prod", outer, inners)
            return outer, inners
        if s.struct[0] != "prod":
            return None
        outer, inners = s.struct[1], list(s.struct[2])
        o = outer.size
        if o == outer_size:
            return outer, inners
        if outer_size % o == 0:
            # finer blocks: each existing block u splits into outer_size / o blocks; the new block
            # index is the pair (u, v), itself a product space over the existing outer
            parts = [self.split(b, outer_size // o, why) for b in inners]
            if any(p is None for p in parts):
                return None
            pairs = self.new(outer_size)
            pairs.struct = ("prod", outer, [p[0] for p in parts])
            return pairs, [b for p in parts for b in p[1]]
        if o % outer_size == 0:
            # coarser blocks: block b gathers o / outer_size existing blocks
            coarse = self.split(outer, outer_size, why)
            if coarse is None:
                return None
            top, subs = coarse
            per = o // outer_size
            blocks = []
            for b, sub in enumerate(subs):
                block = self.new(inner_size)
                block.struct = ("prod", sub, inners[b * per : (b + 1) * per])
                blocks.append(block)
            return top, blocks
        return None

    def segment(self, s: Space, start: int, stop: int) -> Optional[Space]:
        """The sub-space of units [start, stop) (a slice), refining s into a sum, or None."""
        s = find(s)
        if start == 0 and stop == s.size:
            return s
        if s.struct is None:
            bounds = sorted({0, start, stop, s.size})
            parts = [self.new(hi - lo, fixed=s.fixed, why=s.why) for lo, hi in zip(bounds[:-1], bounds[1:])]
            s.struct = ("sum", parts)
            return parts[bounds.index(start)]
        if s.struct[0] != "sum":
            return None
        offset = 0
        for part in s.struct[1]:
            if offset <= start and stop <= offset + part.size:
                return self.segment(part, start - offset, stop - offset)
            offset += part.size
        return None  # spans several parts

    def concat(self, parts: list[Space]) -> Space:
        """A new space made of consecutive parts (torch.cat along a feature axis)."""
        total = self.new(sum(p.size for p in parts))
        total.struct = ("sum", list(parts))
        return total
