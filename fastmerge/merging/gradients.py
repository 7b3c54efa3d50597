"""Per-tensor parameters, as mergekit's configs write them: a value, a gradient (a list of values
interpolated across the layers) or conditions (the first `filter` that is a substring of the
tensor's name, or none, picks the value).

A tensor's position along the layers is mergekit's: layer i of n has t = i / (n - 1) (t = 1 when
there is one layer); tensors outside the layers (embeddings, the final norm, the output head)
have t = 0. The layer of a tensor is read from its name (`...layers.3...`, `h.3`, `layer.3`,
`blocks.3`), the layer count from the largest index among the checkpoint's tensors.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# a tensor in a layer stack: (prefix up to the index, the layer index, the rest of the name)
LAYER_NAME = re.compile(r"^(.*?(?:^|\.)(?:layers|h|layer|blocks)\.)(\d+)(\..+)$")


@dataclass(frozen=True)
class Setting:
    """One parameter's setting: conditions (filter or None, a value or a gradient), first match wins."""

    conditions: tuple[tuple[str | None, float | tuple[float, ...]], ...]

    @classmethod
    def of(cls, value: float) -> Setting:
        return cls(((None, float(value)),))

    @property
    def scalar(self) -> float | None:
        """The value when it is the same for every tensor, else None."""
        if len(self.conditions) == 1 and self.conditions[0][0] in (None, "*"):
            value = self.conditions[0][1]
            return value if isinstance(value, float) else None
        return None

    def at(self, name: str, t: float) -> float | None:
        """The value for tensor `name` at layer position `t` (None: no condition matches)."""
        for condition, value in self.conditions:
            if condition is None or condition == "*" or condition in name:
                return value if isinstance(value, float) else interpolate(value, t)
        return None


def interpolate(values: tuple[float, ...], t: float) -> float:
    """A gradient's value at t in [0, 1]: its points spread evenly, linear in between (mergekit's)."""
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def layer_positions(names: Iterable[str]) -> dict[str, float]:
    """Each tensor's position t along the layers (0 outside them)."""
    names = list(names)
    index = {n: int(m.group(2)) for n in names if (m := LAYER_NAME.match(n))}
    count = max(index.values(), default=-1) + 1
    return {n: (index[n] / (count - 1) if count > 1 else 1.0) if n in index else 0.0 for n in names}


def first(settings: Iterable[Setting | None], name: str, t: float) -> float | None:
    """The first setting (highest precedence first) that gives tensor `name` a value."""
    for setting in settings:
        if setting is not None and (value := setting.at(name, t)) is not None:
            return value
    return None
