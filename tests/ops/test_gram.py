"""fastmerge.ops.gram: the compiled kernel and the torch reference against a float64 product of
the whole tensors, with and without a base, every fused dtype, sizes off the kernel's block; the
same bits for any thread count; NaN/Inf carried into the matrix; bad shapes refused by name."""

import pytest
import torch

from fastmerge import _ext
from fastmerge.errors import ShapeMismatchError
from fastmerge.ops.gram import gram, gram_reference

needs_ext = pytest.mark.skipif(not _ext.load(), reason="the compiled engine did not load")


def _exact(tensors, base):
    rows = torch.stack([t.reshape(-1).double() for t in tensors])
    if base is not None:
        rows -= base.reshape(-1).double()
    return rows @ rows.T


def _inputs(count, numel, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=generator) * 0.02
    tensors = [(base + 0.01 * torch.randn(numel, generator=generator)).to(dtype) for _ in range(count)]
    return tensors, base.to(dtype)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("count, numel", [(1, 1), (2, 255), (3, 65537), (4, 200_003), (16, 1000)])
@pytest.mark.parametrize("with_base", [False, True])
def test_compiled_gram_is_the_float64_product(dtype, count, numel, with_base):
    tensors, base = _inputs(count, numel, dtype, seed=count + numel)
    base = base if with_base else None
    expected = _exact(tensors, base)
    got = torch.ops.fastmerge.gram(tensors, base)
    assert got.dtype == torch.float64 and got.shape == (count, count)
    assert torch.equal(got, got.T)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-300)
    assert torch.allclose(gram_reference(tensors, base), expected, rtol=1e-12, atol=1e-300)


@needs_ext
def test_the_same_bits_for_any_thread_count():
    tensors, base = _inputs(3, 1_000_003, torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.fastmerge.gram(tensors, base)
        torch.set_num_threads(max(2, threads))
        many = torch.ops.fastmerge.gram(tensors, base)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_entry_shows_on_the_diagonal(value):
    tensors, base = _inputs(3, 5000, torch.float32)
    tensors[1][1234] = value
    for g in (gram(tensors, base), gram_reference(tensors, base), gram(tensors)):
        assert not torch.isfinite(g[1, 1]) and torch.isfinite(g[0, 0]) and torch.isfinite(g[2, 2])
    base[7] = value
    assert not torch.isfinite(gram(tensors, base).diagonal()).any()


def test_float64_and_mixed_inputs_run_the_reference_and_bad_shapes_are_refused():
    tensors, base = _inputs(2, 3000, torch.float64)
    assert torch.allclose(gram(tensors, base), _exact(tensors, base), rtol=1e-13)
    with pytest.raises(ShapeMismatchError, match="tensor 1 has shape"):
        gram([tensors[0], tensors[1][:10]], None)
