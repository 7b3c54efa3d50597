"""Shared by the benchmark files: time one side of a Workload with pytest-benchmark."""


def cached_workload(factories, cache: dict, index: int):
    """Builds each workload once (data generation is not timed); keeps one in memory at a time."""
    if index not in cache:
        cache.clear()
        cache[index] = factories[index]()
    return cache[index]


def time_side(benchmark, w, side: str, rounds: int = 3) -> None:
    benchmark.group = w.name
    benchmark.extra_info.update(workload=w.name, side=side, baseline_name=w.baseline_name, ratio_kind=w.ratio_kind,
                                ours_bytes=w.ours_bytes, baseline_bytes=w.baseline_bytes, target=w.target)
    benchmark.pedantic(w.ours if side == "fastmerge" else w.baseline, rounds=rounds, iterations=1, warmup_rounds=1)
