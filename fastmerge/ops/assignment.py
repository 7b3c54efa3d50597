"""Exact linear assignment (Jonker-Volgenant), single or batched, scipy's output convention."""

from __future__ import annotations

import numpy as np
import torch

from .. import _ext
from ..errors import InvalidArgumentError, NonFiniteError


def linear_assignment(cost: torch.Tensor, *, maximize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimal one-to-one assignment of rows to columns.

    Args:
        cost: (n, m) costs, or a batch (b, n, m) of independent problems (e.g. one per attention
            head); any floating dtype, solved in float64. Entries must be finite.
        maximize: maximise the total instead of minimising it (matching by correlation).

    Returns:
        ``(row_ind, col_ind)``, int64, each of length min(n, m) (shape (b, min(n, m)) when batched),
        rows ascending; ``cost[row_ind, col_ind].sum()`` is optimal. Ties are broken the same way on
        every run.

    Raises:
        NonFiniteError: the cost holds NaN or Inf.
        InvalidArgumentError: the cost is not a floating 2-D or 3-D tensor.
    """
    if cost.dim() not in (2, 3) or not cost.is_floating_point():
        raise InvalidArgumentError(
            f"linear_assignment: cost must be a floating (n, m) or (b, n, m) tensor, got {cost.dtype} {tuple(cost.shape)}"
        )
    if cost.device.type != "cpu" and not bool(torch.isfinite(cost).all()):
        # checked here too on a GPU (the kernel checks as well): one place that names the entry
        first = torch.nonzero(~torch.isfinite(cost))[0].tolist()
        raise NonFiniteError(f"linear_assignment: cost has a non-finite entry at {tuple(first[-2:])}"
                             f"{f' of problem {first[0]}' if cost.dim() == 3 else ''}; costs must be finite")
    if _ext.load():
        try:
            return torch.ops.fastmerge.linear_assignment(cost, maximize)
        except ValueError as exc:
            if "non-finite" in str(exc):
                raise NonFiniteError(str(exc)) from None
            raise
    _ext.warn_fallback()
    return linear_assignment_reference(cost, maximize=maximize)


def linear_assignment_reference(cost: torch.Tensor, *, maximize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """scipy.optimize.linear_sum_assignment over each problem (tests' reference and the fallback)."""
    from scipy.optimize import linear_sum_assignment  # start-up time: only the reference needs scipy.optimize

    if not torch.isfinite(cost).all():
        raise NonFiniteError("linear_assignment: cost has a non-finite entry; costs must be finite")
    batch = cost.unsqueeze(0) if cost.dim() == 2 else cost
    k = min(cost.shape[-2:])
    rows, cols = [np.zeros((0, k), np.int64)], [np.zeros((0, k), np.int64)]
    for problem in batch.detach().to(torch.float64).cpu().numpy():
        r, c = linear_sum_assignment(problem, maximize=maximize)
        rows.append(r)
        cols.append(c)
    row_ind = torch.from_numpy(np.concatenate([np.reshape(r, (-1, k)) for r in rows]).astype(np.int64)).to(cost.device)
    col_ind = torch.from_numpy(np.concatenate([np.reshape(c, (-1, k)) for c in cols]).astype(np.int64)).to(cost.device)
    if cost.dim() == 2:
        return row_ind[0], col_ind[0]
    return row_ind, col_ind
