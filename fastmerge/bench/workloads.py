"""The op benchmarks: each workload pairs a fastmerge op with the baseline it is judged against.

Shared by `fastmerge bench` (a quick best-of-n timer) and the pytest-benchmark suite in
benchmarks/, so both time exactly the same calls on exactly the same data.

Ratios (higher is better for fastmerge):
  covariance  throughput ratio  t(baseline addmm_ of X^T X in float32) / t(cov_update_)
  assignment  speed-up          t(scipy.optimize.linear_sum_assignment) / t(linear_assignment)
  combine     bandwidth ratio   (bytes combine reads+writes / t) / (bytes a copy reads+writes / t)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..alignment.weight_matching import Float64Sum, Workspace, _quantile_values_sorted, _quantiles, _rms
from ..merging.methods.gta import magnitude_keep, magnitude_keep_reference
from ..ops import AxisJob, CovarianceState, count_nonfinite, linear_assignment, transform_axes
from ..ops import combine as combine_op
from ..ops.same_init import abs_delta_kth_largest, ties_threshold_count


@dataclass
class Workload:
    name: str        # e.g. "covariance 65536x2048 float32"
    group: str       # the op: covariance / assignment / combine
    ours: Callable[[], object]
    baseline: Callable[[], object]
    baseline_name: str
    ratio_kind: str  # "time" (t_base / t_ours), "bandwidth", or "overhead" (t_ours / t_base, lower is better)
    ours_bytes: float = 0.0  # bytes moved per call, for bandwidth ratios
    baseline_bytes: float = 0.0
    target: float | None = None  # the floor for the ratio
    notes: dict = field(default_factory=dict)

    def ratio(self, t_ours: float, t_baseline: float) -> float:
        if self.ratio_kind == "bandwidth":
            return (self.ours_bytes / t_ours) / (self.baseline_bytes / t_baseline)
        if self.ratio_kind == "overhead":
            return t_ours / t_baseline
        return t_baseline / t_ours

    def met(self, ratio: float) -> bool | None:
        if self.target is None:
            return None
        return ratio <= self.target if self.ratio_kind == "overhead" else ratio >= self.target


def covariance(rows: int = 65536, cols: int = 2048, seed: int = 0) -> Workload:
    gen = torch.Generator().manual_seed(seed)
    # post-ReLU-like features: large mean next to the spread
    x = torch.randn(rows, cols, generator=gen).abs_().add_(torch.rand(cols, generator=gen) * 20)
    state = CovarianceState([cols], pairs="diagonal")
    acc = torch.zeros(cols, cols)
    return Workload(
        name=f"covariance update {rows}x{cols} float32",
        group="covariance",
        ours=lambda: state.update(x),
        baseline=lambda: acc.addmm_(x.T, x),
        baseline_name="float32 addmm_(X^T, X)",
        ratio_kind="time",
        target=0.9,
    )


def _correlation_costs(n: int, gen: torch.Generator) -> np.ndarray:
    """Cross-correlation of two models' units: a noisy hidden permutation, as in activation matching."""
    a = torch.randn(2 * n, n, generator=gen, dtype=torch.float64)
    b = a[:, torch.randperm(n, generator=gen)] + torch.randn(2 * n, n, generator=gen, dtype=torch.float64)
    return -(a.T @ b).numpy() / (2 * n)


def assignment(n: int = 4096, kind: str = "uniform", seed: int = 0) -> Workload:
    from scipy.optimize import linear_sum_assignment  # start-up time: 0.7 s for every CLI command otherwise

    gen = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        cost = torch.rand(n, n, generator=gen, dtype=torch.float64).numpy()
    elif kind == "correlation":
        cost = _correlation_costs(n, gen)
    else:
        raise ValueError(f"unknown cost kind {kind!r}")
    cost_t = torch.from_numpy(cost)
    return Workload(
        name=f"assignment n={n} {kind} costs",
        group="assignment",
        ours=lambda: linear_assignment(cost_t),
        baseline=lambda: linear_sum_assignment(cost),
        baseline_name="scipy linear_sum_assignment",
        ratio_kind="time",
        target=3.0 if kind == "uniform" else None,
    )


def combine(num_models: int = 2, total_params: int = 100_000_000, tensor_params: int = 4_000_000, seed: int = 0) -> Workload:
    gen = torch.Generator().manual_seed(seed)
    sizes = [tensor_params] * (total_params // tensor_params)
    if total_params % tensor_params:
        sizes.append(total_params % tensor_params)
    models = [[torch.randn(s, generator=gen) for s in sizes] for _ in range(num_models)]
    weights = [1.0 / num_models] * num_models
    # Both sides write into buffers allocated once: fresh memory would time the kernel's page
    # faults (on these VMs a fresh 400 MB output costs more than the combination itself).
    out = [torch.empty_like(t) for t in models[0]]
    copy_src = models[0]
    copy_dst = [torch.empty_like(t) for t in copy_src]

    def copy_all():
        for d, s in zip(copy_dst, copy_src):
            d.copy_(s)

    elem = 4
    return Workload(
        name=f"combine {num_models} models, {total_params / 1e6:.0f}M float32 params",
        group="combine",
        ours=lambda: combine_op(models, weights=weights, out=out),
        baseline=copy_all,
        baseline_name="tensor.copy_ of one model (memory-copy bandwidth)",
        ratio_kind="bandwidth",
        ours_bytes=(num_models + 1) * total_params * elem,  # read k inputs, write one output
        baseline_bytes=2 * total_params * elem,             # read one, write one
        target=0.8,
    )


def nonfinite(total_params: int = 200_000_000, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Workload:
    """The input guard of checkpoint merges: NaN/Inf counts of a model's tensors vs torch.isfinite."""
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(4_000_000, generator=gen).to(dtype) for _ in range(total_params // 4_000_000)]

    def isfinite_all():
        return [bool(torch.isfinite(t).all()) for t in tensors]

    return Workload(
        name=f"count_nonfinite {total_params / 1e6:.0f}M {str(dtype).replace('torch.', '')} params",
        group="nonfinite",
        ours=lambda: count_nonfinite(tensors),
        baseline=isfinite_all,
        baseline_name="torch.isfinite(t).all() per tensor",
        ratio_kind="time",
        target=None,
    )


def ties_thresholds(entries: int = 5504 * 2048, models: int = 3, density: float = 0.5,
                    dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Workload:
    """TIES' trimming thresholds of one tensor (the k-th largest |model - base| of each fine-tune):
    the sampled one-pass select of every model at once vs torch.kthvalue per model."""
    gen = torch.Generator().manual_seed(seed)
    base = (0.02 * torch.randn(entries, generator=gen)).to(dtype)
    tunes = [(base.float() + 0.002 * torch.randn(entries, generator=gen)).to(dtype) for _ in range(models)]
    k = ties_threshold_count(entries, density)

    def kthvalue_each():
        return [float((t.float() - base.float()).abs().kthvalue(entries - k + 1).values) for t in tunes]

    return Workload(
        name=f"TIES thresholds {models} x {entries / 1e6:.1f}M {str(dtype).replace('torch.', '')}, density {density}",
        group="ties_thresholds",
        ours=lambda: abs_delta_kth_largest(tunes, base, k),
        baseline=kthvalue_each,
        baseline_name="torch.kthvalue of |model - base| per model",
        ratio_kind="time",
        target=None,
    )


def della_mask(rows: int = 2048, cols: int = 5504, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Workload:
    """DELLA's keep mask of one task vector: the compiled radix sort per row vs the torch reference
    (a stable argsort per row, then the same float64 probabilities and draws): the same mask."""
    gen = torch.Generator().manual_seed(seed)
    delta = (0.002 * torch.randn(rows, cols, generator=gen)).to(dtype)
    return Workload(
        name=f"DELLA keep mask {rows}x{cols} {str(dtype).replace('torch.', '')}",
        group="della_mask",
        ours=lambda: magnitude_keep(delta, 0.5, 0.15, 1),
        baseline=lambda: magnitude_keep_reference(delta, 0.5, 0.15, 1),
        baseline_name="torch: stable argsort per row, ranks, float64 probabilities",
        ratio_kind="time",
        target=None,
    )


def magnitude_quantiles(rows: int = 1024, cols: int = 50257, seed: int = 0) -> Workload:
    """Weight matching's signature quantiles of one member (16 order statistics of each row's
    magnitudes, scaled by the rms) as weight matching computes them (the compiled radix sort where
    built) vs the same from torch's sort of the magnitudes: the same values."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen)
    pick = torch.linspace(0, cols - 1, 16).round().long()

    def sorted_quantiles():
        return _quantile_values_sorted(x, pick).double() / _rms(x)

    return Workload(
        name=f"magnitude quantiles (16 per row) {rows}x{cols} float32",
        group="magnitude_quantiles",
        ours=lambda: _quantiles(x, 16),
        baseline=sorted_quantiles,
        baseline_name="torch.sort of |rows|",
        ratio_kind="time",
        target=None,
    )


def permute_both_axes(rows: int = 4096, cols: int = 1024, seed: int = 0) -> Workload:
    """A weight whose rows and columns are both permuted (an MLP matrix between two aligned groups),
    as weight matching moves every member: transform_axes (one multi-axis gather) vs torch's
    index_select per axis (a full copy per axis)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    p, q = torch.randperm(rows, generator=gen), torch.randperm(cols, generator=gen)
    return Workload(
        name=f"permute rows and columns {rows}x{cols} float32",
        group="transform",
        ours=lambda: transform_axes([w], [AxisJob(0, 0, p), AxisJob(0, 1, q)]),
        baseline=lambda: w.index_select(0, p).index_select(1, q),
        baseline_name="index_select per axis",
        ratio_kind="time",
        target=None,
    )


def float64_cost_sum(size: int = 4096, parts: int = 3, seed: int = 0) -> Workload:
    """Weight matching's cost of a `size`-unit group: `parts` float32 member products summed in
    float64 (Float64Sum: one pass of accumulate_float64_ into reused memory) vs `cost += p.double()`
    into a fresh zeroed cost, part after part (the same bits)."""
    gen = torch.Generator().manual_seed(seed)
    products = [torch.randn(1, size, size, generator=gen) for _ in range(parts)]
    workspace = Workspace()

    def ours():
        total = Float64Sum((1, size, size), "cpu", workspace)
        for p in products:
            total.add(p)
        return total.total()

    def baseline():
        cost = torch.zeros(1, size, size, dtype=torch.float64)
        for p in products:
            cost += p.double()
        return cost

    return Workload(
        name=f"float64 sum of {parts} float32 {size}x{size} products",
        group="cost sums",
        ours=ours,
        baseline=baseline,
        baseline_name="cost += p.double() per part",
        ratio_kind="time",
        target=None,
    )


def standard(quick: bool = False) -> list[Callable[[], Workload]]:
    """The issue's benchmark set (full) or a seconds-long smoke version (quick), as lazy factories."""
    if quick:
        return [
            lambda: covariance(8192, 512),
            lambda: assignment(512, "uniform"),
            lambda: assignment(512, "correlation"),
            lambda: combine(2, 8_000_000, 1_000_000),
            lambda: combine(4, 8_000_000, 1_000_000),
            lambda: nonfinite(8_000_000),
            lambda: ties_thresholds(1 << 20),
            lambda: della_mask(256, 1024),
            lambda: magnitude_quantiles(64, 8192),
            lambda: permute_both_axes(512, 256),
            lambda: float64_cost_sum(512),
        ]
    return [
        lambda: covariance(65536, 2048),
        lambda: assignment(4096, "uniform"),
        lambda: assignment(4096, "correlation"),
        lambda: assignment(1024, "uniform"),
        lambda: combine(2),
        lambda: combine(4),
        lambda: nonfinite(),
        lambda: ties_thresholds(),
        lambda: della_mask(),
        lambda: magnitude_quantiles(),
        lambda: permute_both_axes(),
        lambda: float64_cost_sum(),
    ]
