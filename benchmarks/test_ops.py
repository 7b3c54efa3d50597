"""Op benchmarks: each workload times fastmerge and its baseline in the same run.

    make bench     (= pytest benchmarks --benchmark-json=benchmarks/latest.json; then report.py)

Set FASTMERGE_BENCH_QUICK=1 for the small sizes (a smoke run). Ratios are computed by report.py
from the two timings of each workload; see fastmerge/bench/workloads.py for what each compares.
"""

import os

import pytest

from fastmerge.bench import standard

QUICK = os.environ.get("FASTMERGE_BENCH_QUICK", "0") == "1"
FACTORIES = standard(quick=QUICK)
_cache = {}


def workload(index):
    # Built once per session (data generation is not timed) and shared by both sides.
    if index not in _cache:
        _cache.clear()  # keep one workload's data in memory at a time
        _cache[index] = FACTORIES[index]()
    return _cache[index]


# Both sides of one workload run back to back, on the same data.
@pytest.mark.parametrize("index,side", [(i, side) for i in range(len(FACTORIES)) for side in ("fastmerge", "baseline")])
def test_op(benchmark, index, side):
    w = workload(index)
    benchmark.group = w.name
    benchmark.extra_info.update(
        workload=w.name, side=side, baseline_name=w.baseline_name, ratio_kind=w.ratio_kind,
        ours_bytes=w.ours_bytes, baseline_bytes=w.baseline_bytes, target=w.target,
    )
    fn = w.ours if side == "fastmerge" else w.baseline
    benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
