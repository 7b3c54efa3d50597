"""Stage workloads of small BatchNorm-CNN merges (fastmerge.bench.small_merges): merge overhead over
its forward passes, REPAIR in one pass vs a pass per layer and vs a BN reset, the spec cache.

    .venv/bin/python -m pytest benchmarks/test_small_merges.py --benchmark-json=sm.json
    .venv/bin/python benchmarks/report.py sm.json
"""

import pytest
from _shared import cached_workload, time_side

from fastmerge.bench.small_merges import WORKLOADS

_cache: dict = {}


@pytest.mark.parametrize("index,side", [(i, side) for i in range(len(WORKLOADS)) for side in ("fastmerge", "baseline")])
def test_small_merge_stage(benchmark, index, side):
    time_side(benchmark, cached_workload(WORKLOADS, _cache, index), side)
