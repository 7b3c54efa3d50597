"""Keep masks by rank without a sort (fastmerge.ops.selection), against a stable sort by
(|value|, position): the same entries for every band, dtype and kind of tie, NaN and Inf included;
and SCE's vectorised variance against torch.var to the bit."""

import pytest
import torch

from fastmerge.merging.methods.sce import population_variance
from fastmerge.ops.selection import band_mask, magnitude_at_rank, supports
from tests.helpers import tie_values


def _reference(values: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    order = torch.sort(values.abs().reshape(-1).double(), stable=True).indices
    keep = torch.zeros(values.numel(), dtype=torch.bool)
    keep[order[max(0, lo):max(0, min(hi, values.numel()))]] = True
    return keep.reshape(values.shape)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", ["random", "few distinct", "non-finite", "signed zeros"])
def test_band_mask_keeps_the_ranks_of_a_stable_sort(dtype, kind):
    generator = torch.Generator().manual_seed(hash((str(dtype), kind)) % 2**31)
    for _ in range(25):
        n = int(torch.randint(1, 3000, (), generator=generator))
        values = tie_values(kind, n, dtype, generator)
        lo = int(torch.randint(-2, n + 1, (), generator=generator))
        hi = int(torch.randint(lo, n + 3, (), generator=generator))
        keep = band_mask(values, lo, hi)
        assert keep.shape == values.shape and keep.dtype == torch.bool
        assert torch.equal(keep, _reference(values, lo, hi)), (n, lo, hi)


def test_band_mask_on_a_matrix_and_its_edges():
    values = torch.randn(64, 96).to(torch.bfloat16)
    n = values.numel()
    for lo, hi in ((0, n), (0, 0), (n, n), (0, 1), (n - 1, n), (100, 5000), (5, 4)):
        assert torch.equal(band_mask(values, lo, hi), _reference(values, lo, hi)), (lo, hi)
    assert int(band_mask(values, n - 300, n).sum()) == 300


def test_float64_is_left_to_a_sort():
    assert supports(torch.bfloat16) and supports(torch.float32) and not supports(torch.float64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("models", [2, 3, 5])
def test_population_variance_is_torch_var_to_the_bit(dtype, models):
    generator = torch.Generator().manual_seed(models)
    base = torch.randn(200_000, generator=generator)
    stacked = torch.stack([(base + torch.randn(200_000, generator=generator) * 10.0 ** -k).to(dtype) - base.to(dtype)
                           for k in range(models)])
    stacked[:, ::9] = stacked[0, ::9]  # entries that do not vary
    stacked[1, 4::17] = float("inf")
    expected = torch.var(stacked, dim=0, unbiased=False)
    got = population_variance(stacked)
    assert got.dtype == expected.dtype
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got[~got.isnan()], expected[~expected.isnan()])



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_magnitude_at_rank_is_the_sorted_magnitude(dtype):
    generator = torch.Generator().manual_seed(7)
    values = (torch.randn(5001, generator=generator) * 1e-2).to(dtype)
    values[::9] = values[4]  # ties
    ordered = values.abs().sort().values
    for rank in (0, 1, 2500, 4999, 5000):
        assert magnitude_at_rank(values, rank) == float(ordered[rank]), rank
