"""The float64 accumulation of weight matching's costs (fastmerge::accumulate_float64_ and
Float64Sum): bit-equal to adding the parts one after another in float64."""

import pytest
import torch

from fastmerge import _ext
import fastmerge.alignment.weight_matching as wm
from fastmerge.alignment.weight_matching import Float64Sum, Workspace

pytestmark = pytest.mark.skipif(not _ext.load(), reason="the compiled engine is not built")


def sequential(start, parts):
    total = start.clone()
    for p in parts:
        total += p.double()
    return total


def spread_parts(gen, shape, count, dtype=torch.float32):
    # magnitudes from 1e-6 to 1e6, so the order of the additions shows in the bits
    return [(torch.randn(shape, generator=gen, dtype=torch.float64) * 10.0 ** float(torch.randint(-6, 7, (1,), generator=gen))).to(dtype)
            for _ in range(count)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fresh", [True, False])
def test_accumulate_is_bit_equal_to_sequential_float64_adds(gen, dtype, fresh):
    shape = (3, 517, 129)  # not a multiple of the kernel's block or grain
    parts = spread_parts(gen, shape, 5, dtype)
    start = torch.randn(shape, generator=gen, dtype=torch.float64) * 1e3
    total = torch.full(shape, float("nan"), dtype=torch.float64) if fresh else start.clone()
    torch.ops.fastmerge.accumulate_float64_(total, parts, fresh)
    want = sequential(torch.zeros(shape, dtype=torch.float64) if fresh else start, parts)
    assert torch.equal(total, want)


def test_accumulate_takes_non_contiguous_parts_and_refuses_bad_ones(gen):
    total = torch.zeros(4, 6, dtype=torch.float64)
    part = torch.randn(6, 4, generator=gen).T
    torch.ops.fastmerge.accumulate_float64_(total, [part], False)
    assert torch.equal(total, part.double())
    with pytest.raises(RuntimeError, match="has shape"):
        torch.ops.fastmerge.accumulate_float64_(total, [torch.randn(6, 4)], False)
    with pytest.raises(RuntimeError, match="float32 or all float64"):
        torch.ops.fastmerge.accumulate_float64_(total, [torch.randn(4, 6), torch.randn(4, 6, dtype=torch.float64)], False)
    with pytest.raises(RuntimeError, match="float64"):
        torch.ops.fastmerge.accumulate_float64_(torch.zeros(4, 6), [torch.randn(4, 6)], False)


@pytest.mark.parametrize("with_workspace", [False, True])
def test_float64_sum_equals_sequential_adds_across_flushes_and_dtypes(gen, with_workspace):
    shape = (1, 64, 64)
    workspace = Workspace() if with_workspace else None
    for _ in range(2):  # the second total reuses the first one's memory
        parts = spread_parts(gen, shape, Float64Sum.MAX_PARTS + 3) + spread_parts(gen, shape, 2, torch.float64)
        total = Float64Sum(shape, "cpu", workspace)
        for p in parts:
            out = total.part_buffer(p.dtype)
            if out is not None:
                out.copy_(p)
                p = out
            total.add(p)
        assert torch.equal(total.total(), sequential(torch.zeros(shape, dtype=torch.float64), parts))
    assert torch.equal(Float64Sum(shape, "cpu", workspace).total(), torch.zeros(shape, dtype=torch.float64))


def test_workspace_keeps_the_buffers_of_the_last_shapes_only():
    workspace = Workspace()
    first = workspace.get(("cost", "sum"), (2, 2), torch.float64, torch.device("cpu"))
    assert workspace.get(("cost", "sum"), (2, 2), torch.float64, torch.device("cpu")) is first
    for size in range(3, 3 + Workspace.MAX_SHAPES):
        workspace.get(("cost", "sum"), (size, size), torch.float64, torch.device("cpu"))
    assert workspace.get(("cost", "sum"), (2, 2), torch.float64, torch.device("cpu")) is not first


def test_opcheck(gen):
    total = torch.zeros(3, 5, dtype=torch.float64)
    torch.library.opcheck(torch.ops.fastmerge.accumulate_float64_.default,
                          (total, [torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen)], True))


def test_float64_sum_without_the_engine_adds_part_by_part_in_reused_memory(gen, monkeypatch):
    # the path of CUDA tensors and of a build without the engine: each part added at once, its
    # buffer (slot 0) free again for the next product
    monkeypatch.setattr(wm._ext, "load", lambda: False)
    shape, workspace = (2, 16, 16), Workspace()
    for _ in range(2):
        parts = spread_parts(gen, shape, 5)
        total = Float64Sum(shape, "cpu", workspace)
        for p in parts:
            out = total.part_buffer(p.dtype)
            total.add(out.copy_(p))
        assert torch.equal(total.total(), sequential(torch.zeros(shape, dtype=torch.float64), parts))
