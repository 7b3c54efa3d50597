"""mergekit's generalised task arithmetic (fastmerge.merging.methods.gta): DELLA's keep mask
(MagPrune) from the compiled radix-sort kernel against the torch reference (a stable argsort per
row) to the bit, for every dtype, shape and kind of tie, and its law (a keep probability rising
linearly with the magnitude's rank); the merge over ranges of entries against whole tensors."""

import pytest
import torch

from fastmerge import _ext
from fastmerge.merging.methods.gta import magnitude_keep, magnitude_keep_reference
from fastmerge.ops.same_init import dare_draws
from tests.helpers import tie_values

needs_engine = pytest.mark.skipif(not _ext.load(), reason="the compiled engine is not built")


@needs_engine
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["random", "few distinct", "non-finite", "signed zeros"])
@pytest.mark.parametrize("shape", [(1,), (1, 1), (5, 1), (37,), (64, 257), (3, 4099)])
def test_compiled_mask_is_the_reference(dtype, kind, shape):
    values = tie_values(kind, shape, dtype, torch.Generator().manual_seed(len(shape) * 1000 + shape[-1]))
    compiled = magnitude_keep(values, 0.4, 0.15, seed=12345)
    assert compiled.dtype == torch.bool and compiled.shape == values.shape
    assert torch.equal(compiled, magnitude_keep_reference(values, 0.4, 0.15, seed=12345))


@needs_engine
def test_strided_input_and_seeds():
    values = tie_values("random", (300, 200), torch.bfloat16, torch.Generator().manual_seed(1)).t()
    assert torch.equal(magnitude_keep(values, 0.5, 0.1, 7), magnitude_keep_reference(values, 0.5, 0.1, 7))
    assert not torch.equal(magnitude_keep(values, 0.5, 0.1, 7), magnitude_keep(values, 0.5, 0.1, 8))


def test_three_dimensional_tensors_rank_along_dimension_one():
    density, epsilon, seed = 0.5, 0.2, 3
    values = tie_values("few distinct", (4, 50, 3), torch.float32, torch.Generator().manual_seed(2))
    keep = magnitude_keep(values, density, epsilon, seed)
    draws = dare_draws(seed, 0, values.numel()).reshape(values.shape).double() / (1 << 24)
    for i in range(values.shape[0]):  # each fiber values[i, :, j] on its own, ties by position
        for j in range(values.shape[2]):
            fiber = values[i, :, j].abs().tolist()
            order = sorted(range(len(fiber)), key=lambda r: (fiber[r], r))
            for rank, r in enumerate(order):
                probability = (density - epsilon) + rank / (len(fiber) - 1) * 2 * epsilon
                assert bool(keep[i, r, j]) == bool(draws[i, r, j] < probability)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keep_rate_rises_linearly_with_the_rank(dtype):
    density, epsilon, rows, n = 0.5, 0.2, 400, 1000
    values = torch.randn(rows, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    values = (values * torch.linspace(1, 1000, n, dtype=torch.float64)).to(dtype)  # distinct magnitudes
    keep = magnitude_keep(values, density, epsilon, seed=99).to(torch.float64)
    ranks = values.abs().double().argsort(dim=1).argsort(dim=1)
    for decile in range(10):  # the keep rate of each tenth of the ranks against the law's mean there
        in_decile = (ranks >= decile * n // 10) & (ranks < (decile + 1) * n // 10)
        expected = density - epsilon + 2 * epsilon * float(ranks[in_decile].double().mean()) / (n - 1)
        assert abs(float(keep[in_decile].mean()) - expected) < 0.01  # 40,000 draws: 4 standard errors
    assert abs(float(keep.mean()) - density) < 0.005


def _gta_whole_tensors(tensors, base, weights, keeps, consensus, normalize, scale, rescale):
    """mergekit's generalised task arithmetic on whole tensors at once, with the given keep masks."""
    deltas = []
    for tensor, keep in zip(tensors, keeps):
        delta = tensor - base
        masked = delta * keep
        if rescale:
            before, after = delta.abs().sum(), masked.abs().sum()
            masked = masked if before < 1e-7 or after < 1e-7 else masked * (before / after)
        deltas.append(masked)
    deltas = torch.stack(deltas)
    w = torch.tensor(weights, dtype=base.dtype).reshape(-1, *([1] * base.dim()))
    deltas = deltas * w
    if consensus:
        elected = (deltas.sum(dim=0) >= 0).to(base.dtype) * 2 - 1
        agree = (deltas.sign() == elected).to(base.dtype)
        mixed, divisor = (deltas * agree).sum(dim=0), (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = deltas.sum(dim=0), w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return base + mixed * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sparsify, consensus, rescale", [("della", True, True), ("random", False, True),
                                                          ("random", True, False)])
def test_merge_over_entry_ranges_equals_whole_tensors(dtype, sparsify, consensus, rescale):
    """gta_as_mergekit sparsifies in place and runs the consensus over ranges of entries (several
    here): the same bits as the whole-tensor formulation."""
    from fastmerge.merging.methods.gta import CONSENSUS_CHUNK, gta_as_mergekit, random_keep

    generator = torch.Generator().manual_seed(5)
    shape = (2 * CONSENSUS_CHUNK // 1000 + 7, 1000)
    base = (torch.randn(shape, generator=generator) * 0.02).to(dtype)
    tensors = [(base.float() + torch.randn(shape, generator=generator) * 1e-3 * (k + 1)).to(dtype) for k in range(3)]
    weights, densities, epsilons, seeds = [1.0, 0.5, -0.3], [0.5, 0.7, 0.4], [0.1, 0.2, 0.3], [11, 12, 13]
    merged = gta_as_mergekit(tensors, base, weights, densities, sparsify=sparsify, consensus=consensus,
                             normalize=True, scale=0.8, rescale=rescale, seeds=seeds, epsilons=epsilons)
    if sparsify == "della":
        keeps = [magnitude_keep(t - base, d, e, s) for t, d, e, s in zip(tensors, densities, epsilons, seeds)]
    else:
        keeps = [random_keep(t - base, d, s) for t, d, s in zip(tensors, densities, seeds)]
    expected = _gta_whole_tensors(tensors, base, weights, keeps, consensus, True, 0.8, rescale)
    assert torch.equal(merged, expected)
