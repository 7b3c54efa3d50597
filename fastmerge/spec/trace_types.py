"""What the tracer records: per-value layouts (Info), tap candidates and the trace result (for emit.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .layout import Layout
from .spaces import SpaceTable


@dataclass
class Info:
    """What the tracer knows about one tensor value: a layout per dim."""

    dims: list
    shape: tuple
    param: str | None = None  # state-dict name when the value is a parameter/buffer (or a view of one)
    param_axes: tuple | None = None  # for each dim, the parameter axis it is (None: not an axis of it)
    # the raw output of a Linear/Conv: (weight name, bias name or None), for BatchNorm folding
    produced_by: tuple | None = None


@dataclass
class TapCandidate:
    preference: int  # lower is better
    order: int
    module: str
    dim: int
    layout: Layout
    kind: str = "input"  # TapPoint.kind: "input" of the module, or "heads" (MultiheadAttention, below)


@dataclass
class TraceResult:
    table: SpaceTable
    members: list  # (tensor, axis, space)
    roles: dict  # (tensor, axis) -> set of roles
    taps: list = field(default_factory=list)
    unknown_ops: dict = field(default_factory=dict)
    folds: list = field(default_factory=list)  # NormFold
    norms: list = field(default_factory=list)  # StreamNorm
