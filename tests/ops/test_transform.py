"""Batched per-axis transforms against a float64 reference, and the function-preservation property."""

import pytest
import torch

from fastmerge.errors import IndexOutOfRangeError, ShapeMismatchError
from fastmerge.ops import AxisJob, transform_axes, transform_axes_reference
from tests.helpers import rel_fro

SHAPES = [(7,), (5, 3), (1, 1), (6, 4, 3, 3), (2, 5, 3)]
# Dense products run in float32 for float32/half/bfloat16 weights: error relative to the float64
# reference tied to the precision the output is stored in.
TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def random_jobs(gen, shapes, kinds, matrix_dtype=torch.float64):
    jobs = []
    for t, shape in enumerate(shapes):
        for axis in range(len(shape)):
            n = shape[axis]
            kind = kinds[(t + axis) % len(kinds)]
            if kind == "perm":
                transform = torch.randperm(n, generator=gen)
            elif kind == "gather":
                transform = torch.randint(0, n, (n + 2,), generator=gen)
            elif kind == "square":
                transform = torch.randn(n, n, generator=gen, dtype=matrix_dtype)
            elif kind == "rect":
                transform = torch.randn(n + 1, n, generator=gen, dtype=matrix_dtype)
            else:  # blocks: only where the axis splits
                h = 2 if n % 2 == 0 else 1
                transform = torch.randn(h, 3, n // h, generator=gen, dtype=matrix_dtype)
            jobs.append(AxisJob(t, axis if (t % 2 == 0) else axis - len(shape), transform))
    return jobs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kinds", [["perm"], ["gather"], ["square"], ["rect"], ["blocks"], ["perm", "square", "blocks", "gather", "rect"]])
def test_matches_reference(gen, dtype, kinds):
    tensors = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    jobs = random_jobs(gen, SHAPES, kinds)
    originals = [t.clone() for t in tensors]
    out = transform_axes(tensors, jobs)
    expected = transform_axes_reference(tensors, jobs)
    for got, want, src in zip(out, expected, tensors):
        assert got.dtype == src.dtype and got.shape == want.shape
        if set(kinds) <= {"perm", "gather"}:
            assert torch.equal(got, want)  # a gather is a copy: exact
        else:
            assert rel_fro(got, want) < TOL[dtype]
    for t, o in zip(tensors, originals):
        assert torch.equal(t, o)  # inputs untouched
    assert all(o.data_ptr() != t.data_ptr() for o in out for t in tensors)


def test_float32_matrix_on_float32_weights(gen):
    w = torch.randn(9, 11, generator=gen)
    m = torch.randn(11, 11, generator=gen)
    out = transform_axes([w], [AxisJob(0, 1, m)])[0]
    assert out.dtype == torch.float32
    assert rel_fro(out, w.double() @ m.double().T) < 1e-6


def test_batched_same_shapes_equal_individual_calls(gen):
    # Many same-shaped tensors with different transforms go through one batched GEMM / one gather loop.
    tensors = [torch.randn(16, 8, generator=gen) for _ in range(12)]
    jobs = [AxisJob(i, i % 2, torch.randn(tensors[i].shape[i % 2], tensors[i].shape[i % 2], generator=gen)) for i in range(6)]
    jobs += [AxisJob(i, 0, torch.randperm(16, generator=gen)) for i in range(6, 12)]
    together = transform_axes(tensors, jobs)
    for job, got in zip(jobs, together):
        alone = transform_axes([tensors[job.tensor]], [AxisJob(0, job.axis, job.transform)])[0]
        assert torch.allclose(got, alone, rtol=1e-5, atol=1e-5)


def test_jobs_on_one_tensor_apply_in_order(gen):
    w = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    a, b = torch.randn(4, 4, generator=gen, dtype=torch.float64), torch.randn(3, 4, generator=gen, dtype=torch.float64)
    out = transform_axes([w], [AxisJob(0, 0, a), AxisJob(0, 0, b)])[0]
    assert torch.allclose(out, b @ a @ w)


def test_non_contiguous_and_empty_inputs(gen):
    base = torch.randn(8, 10, generator=gen)
    views = [base.T, base[::2, 1:7], torch.randn(0, 5), torch.randn(3, 0)]
    jobs = [AxisJob(0, 0, torch.randperm(10, generator=gen)), AxisJob(1, 1, torch.randn(6, 6, generator=gen)),
            AxisJob(2, 1, torch.randperm(5, generator=gen)), AxisJob(3, 0, torch.randn(2, 3, generator=gen))]
    out = transform_axes(views, jobs)
    for got, want in zip(out, transform_axes_reference(views, jobs)):
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)
    assert out[3].shape == (2, 0)


def test_untouched_tensors_are_copied(gen):
    w = torch.randn(3, generator=gen)
    out = transform_axes([w], [])
    assert torch.equal(out[0], w) and out[0].data_ptr() != w.data_ptr()


def test_permuted_mlp_computes_the_same_function(gen):
    # The engine's primary property: permuting a hidden layer's producing rows (weight, bias) and its
    # consuming columns with the same index leaves the network's function unchanged, exactly.
    w1, b1 = torch.randn(32, 10, generator=gen, dtype=torch.float64), torch.randn(32, generator=gen, dtype=torch.float64)
    w2, b2 = torch.randn(5, 32, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)
    perm = torch.randperm(32, generator=gen)
    pw1, pb1, pw2, pb2 = transform_axes([w1, b1, w2, b2], [AxisJob(0, 0, perm), AxisJob(1, 0, perm), AxisJob(2, 1, perm)])
    assert torch.equal(pb2, b2)
    x = torch.randn(64, 10, generator=gen, dtype=torch.float64)
    f = lambda a, c, d, e: torch.relu(x @ a.T + c) @ d.T + e  # noqa: E731
    # Equal up to float64 rounding (BLAS sums in a different order for permuted columns).
    assert torch.allclose(torch.relu(x @ pw1.T + pb1), torch.relu(x @ w1.T + b1)[:, perm], rtol=0, atol=1e-13)
    assert torch.allclose(f(pw1, pb1, pw2, pb2), f(w1, b1, w2, b2), rtol=0, atol=1e-12)
    # The same with a dense invertible T on a linear (no-ReLU) path: W1 <- T W1, W2 <- W2 T^-1.
    t = torch.randn(32, 32, generator=gen, dtype=torch.float64) + 6 * torch.eye(32, dtype=torch.float64)
    tw1, tb1, tw2 = transform_axes([w1, b1, w2], [AxisJob(0, 0, t), AxisJob(1, 0, t),
                                                   AxisJob(2, 1, torch.linalg.inv(t).T)])
    lin = lambda a, c, d: (x @ a.T + c) @ d.T  # noqa: E731
    assert torch.allclose(lin(tw1, tb1, tw2), lin(w1, b1, w2), atol=1e-9)


def test_conv_head_blocks(gen):
    # One dense block per attention head on the output axis of a fused projection (4 heads x 8 dims).
    w = torch.randn(32, 16, generator=gen, dtype=torch.float64)
    blocks = torch.randn(4, 8, 8, generator=gen, dtype=torch.float64)
    out = transform_axes([w], [AxisJob(0, 0, blocks)])[0]
    assert torch.allclose(out, torch.block_diag(*blocks) @ w)


def test_bad_jobs_raise_typed_errors(gen):
    w = torch.randn(4, 5, generator=gen)
    with pytest.raises(ShapeMismatchError, match=r"job 0 \(tensor 0, axis 1\).*\(4, 4\).*size 5"):
        transform_axes([w], [AxisJob(0, 1, torch.randn(4, 4))])
    with pytest.raises(ShapeMismatchError, match="blocks"):
        transform_axes([w], [AxisJob(0, 1, torch.randn(2, 3, 3))])
    with pytest.raises(IndexError, match="axis 2"):
        transform_axes([w], [AxisJob(0, 2, torch.randperm(4))])
    with pytest.raises(IndexError, match="tensor 3"):
        transform_axes([w], [AxisJob(3, 0, torch.randperm(4))])
    with pytest.raises(IndexError, match="outside the axis of size 4"):
        transform_axes([w], [AxisJob(0, 0, torch.tensor([0, 1, 2, 4]))])
    with pytest.raises(ShapeMismatchError, match="1-D"):
        transform_axes([w], [AxisJob(0, 0, torch.zeros(2, 2, dtype=torch.long))])


def test_opcheck(gen):
    samples = [
        ([torch.randn(4, 5, generator=gen), torch.randn(5, generator=gen)],
         [torch.randperm(4, generator=gen), torch.randn(5, 5, generator=gen), torch.randperm(5, generator=gen)], [0, 0, 1], [0, 1, 0]),
        ([torch.randn(6, 3, 2, 2, generator=gen, dtype=torch.float64)],
         [torch.randn(2, 2, 3, generator=gen, dtype=torch.float64), torch.randn(4, 3, generator=gen, dtype=torch.float64)], [0, 0], [0, 1]),
        ([torch.randn(3, 3, generator=gen).half()], [torch.randn(3, 3, generator=gen)], [0], [-1]),
    ]
    for args in samples:
        torch.library.opcheck(torch.ops.fastmerge.transform_axes.default, args)


def test_mixed_dtypes_in_one_call(gen):
    tensors = [torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen).half(), torch.randn(6, generator=gen).double()]
    jobs = [AxisJob(0, 1, torch.randn(6, 6, generator=gen)), AxisJob(1, 1, torch.randn(6, 6, generator=gen)),
            AxisJob(2, 0, torch.randperm(6, generator=gen))]
    out = transform_axes(tensors, jobs)
    for got, want, src in zip(out, transform_axes_reference(tensors, jobs), tensors):
        assert got.dtype == src.dtype and rel_fro(got, want) < TOL[src.dtype]


def test_outputs_own_their_memory_and_carry_no_autograd(gen):
    # Same-shaped dense jobs run as one batched GEMM; each output must still be a tensor of its own
    # (serialisers reject shared storage, and one output must not keep the whole batch alive).
    params = [torch.nn.Parameter(torch.randn(8, 5, generator=gen)) for _ in range(4)]
    jobs = [AxisJob(i, 0, torch.randn(8, 8, generator=gen)) for i in range(4)]
    out = transform_axes(params, jobs)
    for o in out:
        assert o.untyped_storage().nbytes() == o.numel() * o.element_size()
        assert not o.requires_grad and o.grad_fn is None
    assert len({o.untyped_storage().data_ptr() for o in out}) == 4


def test_zero_size_transformed_axis(gen):
    w = torch.randn(0, 5, generator=gen)
    job = [AxisJob(0, 0, torch.randn(3, 0, generator=gen))]
    out = transform_axes([w], job)[0]
    assert out.shape == (3, 5) and torch.all(out == 0)
    assert torch.equal(out, transform_axes_reference([w], job)[0])


def test_error_types(gen):
    from fastmerge.errors import FastmergeError, IndexOutOfRangeError

    w = torch.randn(4, 5, generator=gen)
    for job in [AxisJob(0, 0, torch.tensor([0, 1, 2, 9])), AxisJob(2, 0, torch.randperm(4)), AxisJob(0, 3, torch.randperm(4))]:
        with pytest.raises(IndexOutOfRangeError) as info:
            transform_axes([w], [job])
        assert isinstance(info.value, FastmergeError)
    with pytest.raises(ShapeMismatchError, match="needs a floating-point tensor"):
        transform_axes([torch.arange(4)], [AxisJob(0, 0, torch.randn(4, 4))])
    # integer tensors take index transforms (e.g. a permuted lookup table)
    assert torch.equal(transform_axes([torch.arange(4)], [AxisJob(0, 0, torch.tensor([3, 2, 1, 0]))])[0],
                       torch.tensor([3, 2, 1, 0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.uint8, torch.bool])
def test_many_gathers_on_one_tensor_compose_exactly(gen, dtype):
    # A tensor with gathers only is copied once (the gathers composed per axis): several gathers on one
    # axis (lengths changing, e.g. an unmerge after a permutation) interleaved with other axes' must
    # equal applying them one after another.
    shapes = [(6, 5), (4, 3, 5), (7,), (2, 3, 4, 5)]
    tensors = [(torch.randn(s, generator=gen) * 10).to(dtype) for s in shapes]
    jobs = []
    for t, shape in enumerate(shapes):
        sizes = list(shape)
        for _ in range(2 * len(shape) + 1):
            axis = int(torch.randint(0, len(shape), (1,), generator=gen))
            m = sizes[axis] + int(torch.randint(-1, 2, (1,), generator=gen))
            m = max(m, 1)
            jobs.append(AxisJob(t, axis, torch.randint(0, sizes[axis], (m,), generator=gen)))
            sizes[axis] = m
    out = transform_axes(tensors, jobs)
    for got, want in zip(out, transform_axes_reference(tensors, jobs)):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)


def test_a_later_gather_is_checked_against_the_size_it_meets(gen):
    # the second gather on axis 0 meets 3 entries (the first gather's length), not the tensor's 6
    w = torch.randn(6, 4, generator=gen)
    jobs = [AxisJob(0, 0, torch.tensor([5, 0, 1])), AxisJob(0, 1, torch.randperm(4, generator=gen)),
            AxisJob(0, 0, torch.tensor([2, 3]))]
    with pytest.raises(IndexOutOfRangeError, match="job 2.*index 3"):
        transform_axes([w], jobs)
