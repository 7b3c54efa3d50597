"""Order statistics of each row's magnitudes from the compiled radix sort
(fastmerge::magnitude_order_statistics) against torch's sort, for every dtype and kind of tie;
weight matching's signature quantiles bit-identical whichever computes them."""

import pytest
import torch

from fastmerge import _ext
from fastmerge.alignment.weight_matching import _quantile_values_sorted, _quantiles, _rms
from tests.helpers import tie_values

pytestmark = pytest.mark.skipif(not _ext.load(), reason="the compiled engine is not built")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["random", "few distinct", "non-finite", "signed zeros"])
@pytest.mark.parametrize("shape", [(1, 1), (4, 1), (3, 7), (33, 2049), (2, 70001)])
def test_order_statistics_are_the_sorted_magnitudes(dtype, kind, shape):
    values = tie_values(kind, shape, dtype, torch.Generator().manual_seed(shape[0] * 7 + shape[1]))
    positions = sorted({0, shape[1] - 1, shape[1] // 2, shape[1] // 3, min(5, shape[1] - 1)})
    got = torch.ops.fastmerge.magnitude_order_statistics(values, positions)
    want = values.abs().sort(dim=1).values[:, positions]
    assert got.dtype == dtype and got.shape == (shape[0], len(positions))
    assert torch.equal(got.view(torch.int32 if dtype == torch.float32 else torch.int16),
                       want.view(torch.int32 if dtype == torch.float32 else torch.int16))  # NaN bits included


def test_strided_rows_and_bad_positions():
    values = torch.randn(300, 500, generator=torch.Generator().manual_seed(3)).t()
    got = torch.ops.fastmerge.magnitude_order_statistics(values, [0, 299])
    assert torch.equal(got, values.abs().sort(dim=1).values[:, [0, 299]])
    with pytest.raises(RuntimeError, match="outside a row of 300 entries"):
        torch.ops.fastmerge.magnitude_order_statistics(values, [300])
    assert torch.ops.fastmerge.magnitude_order_statistics(torch.empty(0, 5), [1]).shape == (0, 1)


def test_opcheck():
    torch.library.opcheck(torch.ops.fastmerge.magnitude_order_statistics.default, (torch.randn(6, 40), [0, 3, 39]))


@pytest.mark.parametrize("kind", ["random", "few distinct", "non-finite"])
def test_signature_quantiles_do_not_depend_on_the_sort(kind):
    rows = tie_values(kind, (400, 300), torch.float32, torch.Generator().manual_seed(4)).t()  # strided, as unfolded
    compiled = _quantiles(rows, 16)
    pick = torch.linspace(0, rows.shape[1] - 1, 16).round().long()
    contiguous = rows.contiguous()
    sorted_ = _quantile_values_sorted(contiguous, pick).double() / _rms(contiguous)
    # the same order statistics; the scale's sum of squares in another order (last bits)
    assert torch.allclose(compiled.nan_to_num(-1.0), sorted_.nan_to_num(-1.0), rtol=1e-13, atol=0)
    assert torch.equal(compiled.isnan(), sorted_.isnan())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_signature_row_squares_match_float64(dtype):
    rows = (torch.randn(37, 1001, generator=torch.Generator().manual_seed(5)) * 3).to(dtype)
    values, squares = torch.ops.fastmerge.magnitude_signature(rows, [0, 500, 1000])
    assert torch.equal(values, torch.ops.fastmerge.magnitude_order_statistics(rows, [0, 500, 1000]))
    want = rows.double().square().sum(dim=1)
    assert squares.dtype == torch.float64 and torch.allclose(squares, want, rtol=1e-14, atol=0)
    again = torch.ops.fastmerge.magnitude_signature(rows[5:9], [1])[1]
    assert torch.equal(again, squares[5:9])  # each row's sum alone: the same bits whatever the split
    torch.library.opcheck(torch.ops.fastmerge.magnitude_signature.default, (rows.float()[:6, :40], [0, 3, 39]))
