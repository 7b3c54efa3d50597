"""Op benchmarks: each workload times fastmerge and its baseline in the same run.

    make bench     (= pytest benchmarks --benchmark-json=benchmarks/latest.json; then report.py)

Set FASTMERGE_BENCH_QUICK=1 for the small sizes (a smoke run). Ratios are computed by report.py
from the two timings of each workload; see fastmerge/bench/workloads.py for what each compares.
"""

import os

import pytest

from _shared import cached_workload, time_side

from fastmerge.bench import standard

QUICK = os.environ.get("FASTMERGE_BENCH_QUICK", "0") == "1"
FACTORIES = standard(quick=QUICK)
_cache: dict = {}


# Both sides of one workload run back to back, on the same data.
@pytest.mark.parametrize("index,side", [(i, side) for i in range(len(FACTORIES)) for side in ("fastmerge", "baseline")])
def test_op(benchmark, index, side):
    time_side(benchmark, cached_workload(FACTORIES, _cache, index), side)
