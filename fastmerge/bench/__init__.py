"""Op benchmarks: workloads (ours vs baseline) and a small best-of-n timer for `fastmerge bench`."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from .workloads import Workload, standard


@dataclass
class Result:
    workload: Workload
    t_ours: float
    t_baseline: float

    @property
    def ratio(self) -> float:
        return self.workload.ratio(self.t_ours, self.t_baseline)


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time of `repeats` calls after one warm-up call (min is the least noisy estimate)."""
    fn()
    return min(_timed(fn) for _ in range(repeats))


def run(factories: list[Callable[[], Workload]], repeats: int = 3, progress=None) -> list[Result]:
    results = []
    for make in factories:
        w = make()
        if progress:
            progress(w.name)
        # One warm-up each, then interleaved timed calls so a noisy neighbour hits both alike.
        w.ours()
        w.baseline()
        t_ours = t_base = float("inf")
        for _ in range(repeats):
            t_ours = min(t_ours, _timed(w.ours))
            t_base = min(t_base, _timed(w.baseline))
        results.append(Result(w, t_ours, t_base))
        del w
    return results


def format_table(results: list[Result]) -> str:
    rows = ["| workload | fastmerge (s) | baseline | baseline (s) | ratio | target |", "|---|---|---|---|---|---|"]
    for r in results:
        w = r.workload
        kind = {"bandwidth": "bandwidth", "overhead": "time"}.get(w.ratio_kind, "speed")
        bound = "<=" if w.ratio_kind == "overhead" else ">="
        target = f"{bound} {w.target}" if w.target is not None else "report"
        met = w.met(r.ratio)
        ok = "" if met is None else (" (met)" if met else " (MISSED)")
        rows.append(
            f"| {w.name} | {r.t_ours:.4f} | {w.baseline_name} | {r.t_baseline:.4f} | {r.ratio:.2f}x {kind}{ok} | {target} |"
        )
    return "\n".join(rows)


__all__ = ["Result", "Workload", "best_time", "format_table", "run", "standard"]
