"""Property tests over random sizes (hypothesis): every op agrees with its float64 reference."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from fastmerge.ops import (AxisJob, CovarianceState, combine, combine_reference, cov_update_reference,
                           linear_assignment, transform_axes, transform_axes_reference)
from tests.helpers import rel_fro

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)


@SETTINGS
@given(widths=st.lists(st.integers(1, 40), min_size=1, max_size=3), rows=st.integers(0, 300),
       cuts=st.lists(st.integers(0, 300), max_size=4), preset=st.sampled_from(["all_to_one", "full", "diagonal"]),
       seed=st.integers(0, 2**31 - 1))
def test_covariance_streams_like_the_reference(widths, rows, cuts, preset, seed):
    gen = torch.Generator().manual_seed(seed)
    blocks = [torch.randn(rows, w, generator=gen, dtype=torch.float64) * 3 + 10 for w in widths]
    state = CovarianceState(widths, pairs=preset)
    count = torch.zeros((), dtype=torch.float64)
    mean = [torch.zeros(w, dtype=torch.float64) for w in widths]
    m2 = [torch.zeros(widths[a], widths[b], dtype=torch.float64) for a, b in state.pairs]
    bounds = sorted({0, rows, *[min(c, rows) for c in cuts]})
    for start, stop in zip(bounds[:-1], bounds[1:]):
        state.update(*[x[start:stop] for x in blocks])
    cov_update_reference(count, mean, m2, blocks, state.pairs)  # one pass over everything
    assert state.count.item() == count.item() == rows
    for ours, ref in zip(state.m2, m2):
        assert rel_fro(ours, ref) < 1e-10
    for ours, ref in zip(state.mean, mean):
        assert rel_fro(ours, ref) < 1e-12


@st.composite
def tensors_and_jobs(draw):
    shapes = draw(st.lists(st.lists(st.integers(0, 6), min_size=1, max_size=4), min_size=1, max_size=4))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    current = [list(s) for s in shapes]
    jobs = []
    for _ in range(draw(st.integers(0, 6))):
        t = draw(st.integers(0, len(shapes) - 1))
        axis = draw(st.integers(0, len(current[t]) - 1))
        n = current[t][axis]
        kind = draw(st.sampled_from(["gather", "dense", "blocks"]))
        m = draw(st.integers(0, 6))
        if kind == "gather":
            if n == 0 and m > 0:
                continue
            transform = torch.randint(0, max(n, 1), (m,), generator=gen)
        elif kind == "dense":
            transform = torch.randn(m, n, generator=gen, dtype=torch.float64)
        else:
            divisors = [h for h in range(1, n + 1) if n % h == 0]
            if not divisors:
                continue
            h = draw(st.sampled_from(divisors))
            transform = torch.randn(h, m, n // h, generator=gen, dtype=torch.float64)
            m = h * m
        jobs.append(AxisJob(t, axis - len(current[t]) * draw(st.integers(0, 1)), transform))
        current[t][axis] = m
    return tensors, jobs


@SETTINGS
@given(case=tensors_and_jobs())
def test_transforms_match_the_reference(case):
    tensors, jobs = case
    out = transform_axes(tensors, jobs)
    for got, want in zip(out, transform_axes_reference(tensors, jobs)):
        assert got.shape == want.shape
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(k=st.integers(1, 6), shapes=st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=3), min_size=1, max_size=4),
       granularity=st.lists(st.integers(-1, 3), min_size=1, max_size=4), seed=st.integers(0, 2**31 - 1))
def test_combine_matches_the_reference(k, shapes, granularity, seed):
    gen = torch.Generator().manual_seed(seed)
    models = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(k)]
    coefficients = []
    for j in range(k):
        row = []
        for t, s in enumerate(shapes):
            r = granularity[(j + t) % len(granularity)]  # -1: scalar, else leading axes kept
            cshape = () if r < 0 else tuple(s[:r]) + (1,) * (len(s) - min(r, len(s)))
            row.append(torch.randn(cshape, generator=gen, dtype=torch.float64))
        coefficients.append(row)
    out = combine(models, coefficients=coefficients)
    flat = [models[j][t] for t in range(len(shapes)) for j in range(k)]
    flat_c = [coefficients[j][t] for t in range(len(shapes)) for j in range(k)]
    for got, want in zip(out, combine_reference(flat, flat_c, [], k)):
        assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(n=st.integers(0, 12), m=st.integers(0, 12), levels=st.integers(1, 5), maximize=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_assignment_reaches_the_optimum(n, m, levels, maximize, seed):
    rng = np.random.default_rng(seed)
    cost = rng.integers(0, levels, size=(n, m)).astype(np.float64)  # few levels: many ties
    rows, cols = linear_assignment(torch.from_numpy(cost), maximize=maximize)
    r_ref, c_ref = linear_sum_assignment(cost, maximize=maximize)
    assert len(set(cols.tolist())) == len(cols) == min(n, m)
    assert cost[rows.numpy(), cols.numpy()].sum() == cost[r_ref, c_ref].sum()
