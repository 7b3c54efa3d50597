"""count_nonfinite (the merges' input guard) against torch.isfinite, for every float width."""

import pytest
import torch

from fastmerge.ops import count_nonfinite, count_nonfinite_reference

FLOATS = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", FLOATS)
def test_counts_nan_and_both_infinities_and_nothing_else(gen, dtype):
    x = torch.randn(300_001, generator=gen).to(dtype)  # several parallel chunks, odd length
    info = torch.finfo(dtype)
    special = {3: float("nan"), 77: float("inf"), 65_536: -float("inf"), 300_000: float("nan")}
    for i, v in special.items():
        x[i] = v
    x[10], x[11], x[12] = info.max, -info.max, info.tiny / 4  # extremes and a subnormal are finite
    counts = count_nonfinite([x, x[::3], x.view(-1, 1)[:0], torch.arange(7), torch.ones(3, dtype=torch.bool)])
    assert counts.dtype == torch.long and counts.device.type == "cpu"
    assert counts.tolist() == [4, int((~torch.isfinite(x[::3])).sum()), 0, 0, 0]
    assert count_nonfinite_reference([x]).tolist() == [4]


def test_negative_nan_payloads_count_too():
    bits = torch.tensor([0x7FC00001, -0x00400000, 0x7F800000, 0x7F7FFFFF], dtype=torch.int32)  # NaN, -NaN, inf, max
    assert count_nonfinite([bits.view(torch.float32)]).tolist() == [3]


def test_no_tensors():
    assert count_nonfinite([]).tolist() == []
