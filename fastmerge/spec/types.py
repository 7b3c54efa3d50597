"""MergeSpec: which weight axes move together, and how a group's transform lands on each of them.

A *group* is a set of C units (a hidden layer, a residual stream, the heads of an attention
layer, the dims of each head) that must all receive the same transform. It may come in `count`
independent *instances* (one per attention head: each head's dims get their own permutation).

A *member* says where the group's units sit on one axis of one tensor. The axis (or the slice
``[offset, offset + prod(factors))`` of it) is viewed as a row-major grid of ``factors``; the
group's units run along ``factors[unit]``; the instance is the row-major index over the levels
listed in ``instance``; levels in ``select`` only take part for the listed values (a fused QKV
projection: the Q and K thirds belong to one group, the V third to another); every other level
is a *replica*: the same transform is applied for each of its values (the d dims inside one head
when heads are permuted, the spatial positions of a conv channel after a flatten).

Examples (C = 32 hidden units of fc1 consumed by fc2; H = 4 heads of d = 8 dims)::

    Member("fc1.weight", 0, role="out")                           # rows of fc1
    Member("fc2.weight", 1, role="in")                            # columns of fc2
    Member("attn.q.weight", 0, factors=(4, 8), unit=0)            # heads: blocks of 8 rows
    Member("attn.q.weight", 0, factors=(4, 8), unit=1, instance=(0,))  # dims of each head

Roles record how a dense transform T would apply (permutations ignore them): ``out`` rows of a
producer (W <- T W, b <- T b), ``in`` columns of a consumer (W <- W T^-1), ``param`` per-unit
parameters and statistics (norm weights, running stats) that only permutations move exactly,
``gate`` producer rows of units that are multiplied elementwise with another projection's units (a
gated MLP's gate and up rows: a dense transform of each factor is not one of the product).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import SpecError
from .grid import AxisGrid

ROLES = ("out", "in", "param", "gate")
# where a tap reads: the module's input `arg`, its output (element `arg` of a tuple), or "heads": the
# per-head outputs of an nn.MultiheadAttention, recomputed from its call (stats/attention.py)
TAP_KINDS = ("input", "output", "heads")


@dataclass(frozen=True)
class Member(AxisGrid):
    """Where a group's units sit on one axis of one tensor (see the module docstring)."""

    tensor: str
    axis: int
    role: str = "param"
    factors: tuple[int, ...] | None = None  # None: the whole axis is the unit level
    unit: int = 0
    instance: tuple[int, ...] = ()
    select: tuple[tuple[int, tuple[int, ...]], ...] = ()
    offset: int = 0

    def gather_index(self, axis_size: int, perms: torch.Tensor) -> torch.Tensor:
        """Index for a gather along the axis that applies ``perms`` (count, size) to this member:
        ``new[..., pos(i, u), ...] = old[..., pos(i, perms[i, u]), ...]``."""
        grid = self.grid(axis_size)
        device = perms.device  # built where the permutations are: no copies between devices
        index = torch.arange(axis_size, device=device)
        positions = self.positions(axis_size, device)
        # perms[inst] appends the unit axis; it replaces the (size-1) unit level.
        table = perms[self.instance_ids(grid, device)].squeeze(self.unit).movedim(-1, self.unit)
        moved = torch.take_along_dim(positions, table.expand(grid), dim=self.unit)
        if self.select:
            moved = torch.where(self.selected(grid, device), moved, positions)
        index[self.offset : self.offset + positions.numel()] = moved.reshape(-1)
        return index

    def dense_matrix(self, axis_size: int, mats: torch.Tensor) -> torch.Tensor:
        """(axis_size, axis_size) matrix M of the transform ``new[p] = sum_q M[p, q] old[q]`` that
        applies mats[i] (size x size) to the units of instance i, for every replica position, and
        leaves every other position as it is."""
        grid = self.grid(axis_size)
        device = mats.device
        matrix = torch.eye(axis_size, dtype=mats.dtype, device=device)
        positions = self.positions(axis_size, device)
        inst = self.instance_ids(grid, device).expand(grid)
        selected = self.selected(grid, device)
        # one row per (instance, replica) cell with the unit level last
        pos = positions.movedim(self.unit, -1).reshape(-1, grid[self.unit])
        ids = inst.movedim(self.unit, -1).reshape(-1, grid[self.unit])[:, 0]
        keep = selected.movedim(self.unit, -1).reshape(-1, grid[self.unit])[:, 0]
        pos, ids = pos[keep], ids[keep]
        matrix[pos[:, :, None], pos[:, None, :]] = mats[ids]
        return matrix


@dataclass(frozen=True)
class TapPoint(AxisGrid):
    """Where a group's features can be observed: an input (or output) of a module, the axis `dim`
    of that tensor laid out like a member (grid `factors`, units on level `unit`...); `kind` is
    one of TAP_KINDS."""

    module: str
    kind: str = "input"
    arg: int = 0
    dim: int = -1
    factors: tuple[int, ...] | None = None
    unit: int = 0
    instance: tuple[int, ...] = ()
    select: tuple[tuple[int, tuple[int, ...]], ...] = ()
    offset: int = 0


@dataclass(frozen=True)
class Group:
    name: str
    size: int
    members: tuple[Member, ...]
    count: int = 1
    tap: TapPoint | None = None


@dataclass(frozen=True)
class NormFold:
    """An eval-mode BatchNorm that reads the output of one Linear/Conv and nothing else: it can be
    folded into that producer (W <- s W, b <- s (b - mean) + beta, s = gamma / sqrt(var + eps)),
    which turns the pair into one affine map that dense transforms move exactly.

    producer / producer_bias: the producer's weight and bias tensors (bias None: it has none);
    norm: the BatchNorm's module path (its weight, bias, running_mean, running_var tensors)."""

    producer: str
    producer_bias: str | None
    norm: str
    eps: float = 1e-5

    def tensor(self, what: str) -> str:
        """The BatchNorm's tensor `what` (weight, bias, running_mean, running_var)."""
        return f"{self.norm}.{what}" if self.norm else what


@dataclass(frozen=True)
class StreamNorm:
    """A LayerNorm or RMSNorm over the last axis whose output only Linear layers read, each through
    a weight of its own (not tied, not shared): its affine part folds into those readers
    (W <- W diag(gamma), b <- b + W beta), leaving a bare normalisation. A bare RMSNorm commutes
    with every orthogonal map of its units, a bare LayerNorm with those that fix the all-ones
    direction once the stream it reads is mean-free (fastmerge.spec.residual): the exact dense
    transforms of a pre-norm transformer's residual stream.

    kind: "layer" or "rms"; weight / bias: the norm's tensors (None: it has none);
    readers: (weight, bias or None, input axis of the weight) of each Linear reading its output
    (axis 1 for nn.Linear's (out, in) weights, 0 for Hugging Face Conv1D's (in, out));
    obstacle: why the affine part cannot be folded (readers then empty), e.g. a tied LM head."""

    kind: str
    weight: str | None
    bias: str | None
    readers: tuple[tuple[str, str | None, int], ...] = ()
    obstacle: str = ""


@dataclass
class MergeSpec:
    """The groups of a model, in the order their transforms are applied.

    Order matters only for nested groups: an instanced group's instance i refers to the block at
    position i after the groups listed before it have been applied (heads before head dims).
    """

    groups: list[Group] = field(default_factory=list)
    # (tensor, axis, reason) of axes a tracer left out on purpose, for reports.
    fixed: list[tuple[str, int, str]] = field(default_factory=list)
    # BatchNorms that can be folded into their producer (fastmerge.spec.folding)
    folds: list[NormFold] = field(default_factory=list)
    # LayerNorms/RMSNorms whose affine part folds into their readers (fastmerge.spec.residual)
    norms: list[StreamNorm] = field(default_factory=list)

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise SpecError(f"no group named {name!r}; groups are {[g.name for g in self.groups]}")

    def validate(self, shapes: Mapping[str, Sequence[int]]) -> None:
        """Checks every member against the tensors' shapes ({name: shape}, e.g. from a state
        dict). Raises SpecError naming the group and member at the first problem."""
        names = set()
        for g in self.groups:
            if g.name in names:
                raise SpecError(f"two groups are named {g.name!r}")
            names.add(g.name)
            if g.size < 1 or g.count < 1:
                raise SpecError(f"group {g.name!r}: size and count must be >= 1, got {g.size} and {g.count}")
            for m in g.members:
                _validate_member(g, m, shapes)
        for f in self.folds:
            _validate_fold(f, shapes)
        for norm in self.norms:
            _validate_norm(norm, shapes)

    def random_permutations(self, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One random permutation per group instance: the transforms check_spec draws."""
        return {g.name: torch.stack([torch.randperm(g.size, generator=generator) for _ in range(g.count)])
                for g in self.groups}

    def summary(self) -> str:
        lines = [f"{len(self.groups)} groups"]
        for g in self.groups:
            inst = f" x {g.count} instances" if g.count > 1 else ""
            tap = f", tap {g.tap.module}:{g.tap.kind}" if g.tap else ""
            lines.append(f"  {g.name}: {g.size} units{inst}, {len(g.members)} members{tap}")
        return "\n".join(lines)


def _validate_fold(f: NormFold, shapes: Mapping[str, Sequence[int]]) -> None:
    names = [f.producer, *([f.producer_bias] if f.producer_bias else []),
             *(f.tensor(w) for w in ("weight", "bias", "running_mean", "running_var"))]
    missing = [n for n in names if n not in shapes]
    if missing:
        raise SpecError(f"fold of BatchNorm {f.norm!r} into {f.producer!r}: the model has no tensor {missing[0]!r}")
    units = shapes[f.producer][0] if len(shapes[f.producer]) else 0
    wrong = [n for n in names[1:] if tuple(shapes[n]) != (units,)]
    if wrong:
        raise SpecError(f"fold of BatchNorm {f.norm!r} into {f.producer!r}: {wrong[0]!r} has shape "
                        f"{tuple(shapes[wrong[0]])}, expected ({units},) (one entry per output unit)")


def _validate_norm(norm: StreamNorm, shapes: Mapping[str, Sequence[int]]) -> None:
    where = f"{norm.kind} norm {norm.weight or '(no affine)'}"
    if norm.kind not in ("layer", "rms"):
        raise SpecError(f"{where}: kind must be 'layer' or 'rms', got {norm.kind!r}")
    names = [n for n in (norm.weight, norm.bias) if n]
    if norm.obstacle:
        missing = [n for n in names if n not in shapes]
        if missing:
            raise SpecError(f"{where}: the model has no tensor {missing[0]!r}")
        return
    if not norm.readers:
        raise SpecError(f"{where}: a stream norm needs at least one reader (or an obstacle)")
    missing = [n for n in names + [n for r in norm.readers for n in r[:2] if n] if n not in shapes]
    if missing:
        raise SpecError(f"{where}: the model has no tensor {missing[0]!r}")
    if any(len(shapes[w]) != 2 or axis not in (0, 1) for w, _, axis in norm.readers):
        raise SpecError(f"{where}: its readers must be 2-d Linear/Conv1D weights with input axis 0 or 1")
    widths = {shapes[w][axis] for w, _, axis in norm.readers}
    units = widths.pop()
    if widths or any(tuple(shapes[n]) != (units,) for n in names):
        raise SpecError(f"{where}: its readers' input width and its weight/bias must agree ({units} units)")
    for w, b, axis in norm.readers:
        if b is not None and tuple(shapes[b]) != (shapes[w][1 - axis],):
            raise SpecError(f"{where}: reader bias {b!r} has shape {tuple(shapes[b])}, expected ({shapes[w][1 - axis]},)")


def _validate_member(g: Group, m: Member, shapes: Mapping[str, Sequence[int]]) -> None:
    where = f"group {g.name!r}, member {m.tensor}:{m.axis}"
    if m.tensor not in shapes:
        raise SpecError(f"{where}: the model has no tensor {m.tensor!r}")
    shape = shapes[m.tensor]
    if not 0 <= m.axis < len(shape):
        raise SpecError(f"{where}: axis {m.axis} is outside the tensor's {len(shape)} dims (shape {tuple(shape)})")
    if m.role not in ROLES:
        raise SpecError(f"{where}: role must be one of {ROLES}, got {m.role!r}")
    grid = m.grid(shape[m.axis])
    if m.offset < 0 or m.offset + math.prod(grid) > shape[m.axis] or any(f < 1 for f in grid):
        raise SpecError(f"{where}: offset {m.offset} + grid {grid} does not fit the axis of size {shape[m.axis]}")
    if not 0 <= m.unit < len(grid) or grid[m.unit] != g.size:
        raise SpecError(f"{where}: unit level {m.unit} of grid {grid} must have the group size {g.size}")
    levels = set(m.instance) | {lvl for lvl, _ in m.select}
    if any(not 0 <= lvl < len(grid) or lvl == m.unit for lvl in levels) or len(set(m.instance)) != len(m.instance):
        raise SpecError(f"{where}: instance/select levels {sorted(levels)} must be distinct levels of {grid} other than the unit level")
    if math.prod(grid[j] for j in m.instance) != g.count:
        raise SpecError(f"{where}: instance levels {m.instance} of grid {grid} give "
                        f"{math.prod(grid[j] for j in m.instance)} instances, the group has {g.count}")
    for lvl, values in m.select:
        if not values or any(not 0 <= v < grid[lvl] for v in values):
            raise SpecError(f"{where}: select values {values} are outside level {lvl} of size {grid[lvl]}")
