"""Linear assignment against scipy.optimize.linear_sum_assignment: same optimum on every input."""

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment as scipy_lsa

from fastmerge.errors import NonFiniteError
from fastmerge.ops import linear_assignment


def check_against_scipy(cost: torch.Tensor, maximize: bool):
    rows, cols = linear_assignment(cost, maximize=maximize)
    c = cost.double().numpy()
    r_ref, c_ref = scipy_lsa(c, maximize=maximize)
    k = min(cost.shape)
    assert rows.dtype == cols.dtype == torch.int64 and rows.shape == cols.shape == (k,)
    assert torch.equal(rows, torch.sort(rows).values)  # rows ascending, as scipy
    assert len(set(rows.tolist())) == k and len(set(cols.tolist())) == k  # one-to-one
    assert rows.min().item() >= 0 if k else True
    ours, best = c[rows.numpy(), cols.numpy()].sum(), c[r_ref, c_ref].sum()
    scale = max(1.0, np.abs(c).sum())
    assert abs(ours - best) <= 1e-12 * scale, (ours, best)
    return rows, cols


def cases(gen):
    """Random, tied, degenerate and structured costs, square and rectangular."""
    yield "uniform", torch.rand(50, 50, generator=gen, dtype=torch.float64)
    yield "float32", torch.rand(33, 33, generator=gen)
    yield "rect_wide", torch.rand(7, 19, generator=gen, dtype=torch.float64)
    yield "rect_tall", torch.rand(23, 6, generator=gen, dtype=torch.float64)
    yield "rect_100x1000", torch.rand(100, 1000, generator=gen, dtype=torch.float64)
    yield "integer_ties", torch.randint(0, 4, (40, 40), generator=gen).double()
    yield "integer_ties_rect", torch.randint(0, 3, (12, 30), generator=gen).double()
    yield "all_equal", torch.full((17, 17), 2.5, dtype=torch.float64)
    yield "one_by_one", torch.tensor([[3.0]], dtype=torch.float64)
    yield "one_by_n", torch.rand(1, 9, generator=gen, dtype=torch.float64)
    yield "n_by_one", torch.rand(9, 1, generator=gen, dtype=torch.float64)
    yield "empty_rows", torch.zeros(0, 5, dtype=torch.float64)
    yield "empty_cols", torch.zeros(5, 0, dtype=torch.float64)
    yield "negative_large_offset", torch.randn(30, 30, generator=gen, dtype=torch.float64) * 1e3 - 1e6
    a = torch.randn(400, 64, generator=gen, dtype=torch.float64)
    b = a[:, torch.randperm(64, generator=gen)] + 0.5 * torch.randn(400, 64, generator=gen, dtype=torch.float64)
    yield "correlation", torch.corrcoef(torch.cat([a, b], 1).T)[:64, 64:]
    yield "large_uniform", torch.rand(700, 700, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("maximize", [False, True])
def test_same_optimum_as_scipy(gen, maximize):
    for name, cost in cases(gen):
        check_against_scipy(cost, maximize)


def test_many_small_random_problems(gen):
    for trial in range(300):
        n = int(torch.randint(1, 12, (1,), generator=gen))
        m = int(torch.randint(1, 12, (1,), generator=gen))
        if trial % 3 == 0:
            cost = torch.randint(-3, 3, (n, m), generator=gen).double()  # heavy ties
        else:
            cost = torch.randn(n, m, generator=gen, dtype=torch.float64)
        check_against_scipy(cost, maximize=bool(trial % 2))


def test_recovers_a_hidden_permutation(gen):
    # Matching units by correlation: cost = permutation matrix + noise, maximised.
    n = 256
    perm = torch.randperm(n, generator=gen)
    cost = torch.zeros(n, n, dtype=torch.float64)
    cost[torch.arange(n), perm] = 1.0
    cost += 0.1 * torch.rand(n, n, generator=gen, dtype=torch.float64)
    rows, cols = linear_assignment(cost, maximize=True)
    assert torch.equal(rows, torch.arange(n)) and torch.equal(cols, perm)


def test_deterministic_under_ties(gen):
    cost = torch.randint(0, 2, (60, 60), generator=gen).double()
    first = linear_assignment(cost)
    for _ in range(3):
        again = linear_assignment(cost.clone())
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_batched_equals_one_by_one(gen):
    batch = torch.randn(20, 8, 8, generator=gen)
    rows, cols = linear_assignment(batch, maximize=True)
    assert rows.shape == cols.shape == (20, 8)
    for b in range(20):
        r, c = linear_assignment(batch[b], maximize=True)
        assert torch.equal(rows[b], r) and torch.equal(cols[b], c)
        check_against_scipy(batch[b], True)
    tall = torch.rand(5, 9, 4, generator=gen, dtype=torch.float64)
    rows, cols = linear_assignment(tall)
    assert rows.shape == (5, 4)
    for b in range(5):
        assert torch.equal(cols[b], linear_assignment(tall[b])[1])
    assert linear_assignment(torch.zeros(0, 3, 3))[0].shape == (0, 3)


def test_inputs_untouched_and_non_contiguous(gen):
    base = torch.rand(30, 20, generator=gen, dtype=torch.float64)
    view = base.T  # (20, 30), non-contiguous
    before = base.clone()
    check_against_scipy(view, maximize=False)
    assert torch.equal(base, before)


def test_non_finite_costs_raise(gen):
    for bad in (float("nan"), float("inf"), -float("inf")):
        cost = torch.rand(5, 5, generator=gen, dtype=torch.float64)
        cost[2, 3] = bad
        with pytest.raises(NonFiniteError, match=r"\(2, 3\)"):
            linear_assignment(cost)
    batch = torch.rand(3, 4, 4, generator=gen)
    batch[1, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"cost\[1\]"):
        linear_assignment(batch)
    with pytest.raises(ValueError, match="floating"):
        linear_assignment(torch.zeros(3, 3, dtype=torch.long))


def test_opcheck(gen):
    for args in [(torch.rand(6, 6, generator=gen), False), (torch.rand(4, 9, generator=gen, dtype=torch.float64), True),
                 (torch.rand(3, 5, 2, generator=gen), True), (torch.zeros(0, 2), False)]:
        torch.library.opcheck(torch.ops.fastmerge.linear_assignment.default, args)
