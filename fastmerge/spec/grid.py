"""The grid view of one tensor axis, shared by spec members and tap points.

The axis (or its slice ``[offset, offset + prod(factors))``) is a row-major grid of ``factors``
(None: the whole rest of the axis is one level); the group's units run along level ``unit``;
``instance`` lists the levels whose row-major index is the instance; ``select`` restricts levels
to the listed values; every other level is a replica.
"""

from __future__ import annotations

import math

import torch


class AxisGrid:
    """Grid methods for a frozen dataclass with the fields ``factors``, ``unit``, ``instance``,
    ``select`` and ``offset`` (Member, TapPoint). Adds no fields."""

    factors: tuple[int, ...] | None
    unit: int
    instance: tuple[int, ...]
    select: tuple[tuple[int, tuple[int, ...]], ...]
    offset: int

    def grid(self, axis_size: int) -> tuple[int, ...]:
        return self.factors if self.factors is not None else (axis_size - self.offset,)

    def positions(self, axis_size: int, device=None) -> torch.Tensor:
        """Axis position of every grid cell (a tensor shaped like the grid)."""
        grid = self.grid(axis_size)
        return torch.arange(self.offset, self.offset + math.prod(grid), device=device).view(grid)

    def instance_ids(self, grid: tuple[int, ...], device=None) -> torch.Tensor:
        """Instance id of every grid cell (row-major over the instance levels), broadcastable
        to the grid, with a size-1 unit level."""
        ndim = len(grid)
        inst = torch.zeros([grid[j] if j in self.instance else 1 for j in range(ndim)], dtype=torch.long, device=device)
        stride = 1
        for j in reversed(self.instance):
            shape = [1] * ndim
            shape[j] = grid[j]
            inst = inst + torch.arange(grid[j], device=device).view(shape) * stride
            stride *= grid[j]
        return inst

    def selected(self, grid: tuple[int, ...], device=None) -> torch.Tensor:
        """Boolean mask shaped like the grid: the cells that `select` keeps."""
        mask = torch.ones(grid, dtype=torch.bool, device=device)
        for level, values in self.select:
            shape = [1] * len(grid)
            shape[level] = grid[level]
            keep = torch.zeros(grid[level], dtype=torch.bool, device=device)
            keep[list(values)] = True
            mask = mask & keep.view(shape)
        return mask

    def cells(self, x: torch.Tensor, dim: int, *, grid_last: bool = False) -> torch.Tensor:
        """`x` with the grid of axis `dim` split out: (*grid, rest), or (rest, *grid) with
        `grid_last`. Selected levels keep only their listed values, in the listed order; rest runs
        over the other axes of `x`, in their order. A view of `x` where reshaping allows; a copy
        is laid out row-major in the returned order."""
        at = -1 if grid_last else 0
        w = x.movedim(dim, at)
        axis_size = w.shape[at]
        rest = math.prod(w.shape[:-1] if grid_last else w.shape[1:])
        grid = self.grid(axis_size)
        # flatten first, then slice: a copy keeps the whole axis's strides, as the callers' did
        w = w.reshape((rest, axis_size) if grid_last else (axis_size, rest))
        w = w.narrow(at, self.offset, math.prod(grid))
        w = w.reshape((rest, *grid) if grid_last else (*grid, rest))
        for level, values in self.select:
            w = w.index_select(level + (1 if grid_last else 0), torch.tensor(values, dtype=torch.long, device=w.device))
        return w
