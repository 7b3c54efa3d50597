"""What an alignment method is, and the registry of them (fastmerge.alignment.METHODS).

Every method aligns the groups that activation statistics can observe with a permutation first
(matching on the cross-correlation); a method with a `dense` function then replaces that
permutation by a dense transform on the groups where one is exact. Groups statistics cannot see
(attention heads, their dims, groups without a tap) and every group of a data-free method are
aligned by weight matching, so its options are accepted by every method.

Adding a method: one module in this package that calls `register(AlignmentMethod(...))`, imported
by the package's __init__; the API, the CLI's choices, the demo and the bench take it from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

from ...errors import InvalidArgumentError
from ...registry import Registry
from ...spec.types import Group


@dataclass(frozen=True)
class WeightMatchingOptions:
    """Weight matching (Git Re-Basin coordinate descent): `max_iter` sweeps over the groups in a
    `seed`-ed random order, `restarts` descents from different orders (the best objective is kept),
    `merge_many` aligning every model to the mean of the others (default: for more than 2 models)."""

    max_iter: int = 100
    seed: int = 0
    merge_many: bool | None = None
    restarts: int = 1


@dataclass(frozen=True)
class NoOptions:
    """A method without options of its own."""


# dense(group, stats, reference=, n=, options=, info=, perms=) -> one transform per model (None: keep
# its permutation), writing per-model diagnostics into `info`; perms: the group's activation-matching
# permutations ((1, size) per model), e.g. to break ties
DenseFunction = Callable[..., list]


@dataclass(frozen=True)
class AlignmentMethod:
    """An alignment method as the registry holds it.

    name: what the API and the CLI call it; label: its name in tables.
    options: the frozen dataclass of its own options (keyword arguments of fastmerge.align).
    statistics: the block pairs of activation statistics it needs ("all_to_one", "full"), or None
        for a data-free method.
    dense: builds the group's dense transforms from the statistics (None: permutations only).
    residual: orthogonal transforms of residual-stream groups in canonical form
        (fastmerge.spec.residual; the option `residual="permute"` turns it off), or None;
    grid: for n models, the option sets worth trying on validation data (demo, bench);
    grid_label: what the grid varies, for table captions ("" when nothing is tuned)."""

    name: str
    label: str
    options: type = NoOptions
    statistics: str | None = "all_to_one"
    dense: DenseFunction | None = None
    residual: DenseFunction | None = None
    grid: Callable[[int], list[dict]] = lambda n: [{}]
    grid_label: str = ""

    def wants_residual(self, own) -> bool:
        """Whether, with its options `own`, the method aligns residual streams orthogonally."""
        return self.residual is not None and getattr(own, "residual", "orthogonal") == "orthogonal"

    def parse_options(self, options: dict) -> tuple[object, WeightMatchingOptions]:
        """(own options, weight matching options) from fastmerge.align's keyword arguments."""
        own = {f.name for f in fields(self.options)}
        matching = {f.name for f in fields(WeightMatchingOptions)}
        unknown = set(options) - own - matching
        if unknown:
            raise InvalidArgumentError(f"alignment method {self.name!r} has no option(s) {sorted(unknown)}; "
                                       f"its options are {sorted(own | matching)}")
        return (self.options(**{k: v for k, v in options.items() if k in own}),
                WeightMatchingOptions(**{k: v for k, v in options.items() if k in matching}))


METHODS: Registry[AlignmentMethod] = Registry("alignment method")
register = METHODS.register
get_method = METHODS.lookup


def dense_ok(group: Group) -> bool:
    """A dense transform is exact on linear producers/consumers only (not on norm parameters,
    running statistics or other per-unit parameters)."""
    return not dense_blockers(group)


def dense_blockers(group: Group) -> list[str]:
    """The tensors of a group that a dense transform would not move exactly: per-unit parameters
    (norm weights and biases that are not folded, running statistics, scales)."""
    return list(dict.fromkeys(m.tensor for m in group.members if m.role not in ("out", "in")))
