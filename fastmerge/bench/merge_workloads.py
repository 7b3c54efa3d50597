"""Merge-pipeline benchmarks (issue 4): statistics overhead, CCA vs the three-SVD formulation,
weight matching on a GPT-2-small-shaped pair against a straightforward reference loop."""

from __future__ import annotations

import numpy as np
import torch

from .workloads import Workload


def stats_overhead(width: int = 4, image: int = 32, batch: int = 32, batches: int = 2, seed: int = 0) -> Workload:
    """collect_stats for two ResNet-20xW models vs the plain forward passes over the same batches."""
    from .. import collect_stats, zoo
    from ..spec import trace_spec

    torch.manual_seed(seed)
    models = [zoo.resnet20(in_channels=3, width=width).eval() for _ in range(2)]
    gen = torch.Generator().manual_seed(seed)
    data = [torch.randn(batch, 3, image, image, generator=gen) for _ in range(batches)]
    spec = trace_spec(models[0], (data[0][:2],))

    def forward_only():
        with torch.no_grad():
            for x in data:
                for m in models:
                    m(x)

    return Workload(
        name=f"activation statistics, 2 x ResNet-20x{width}, {batches} batches of {batch}x3x{image}x{image}",
        group="merge", ours=lambda: collect_stats(models, data, spec, progress=False), baseline=forward_only,
        baseline_name="the same forward passes without statistics", ratio_kind="overhead", target=1.3)


def _three_svd_cca(s_xx: np.ndarray, s_yy: np.ndarray, s_xy: np.ndarray, g: float):
    """The reference formulation: inverse square roots and the canonical directions by three
    SVDs, the inverse transform by a matrix inverse (float64 numpy)."""
    eye = np.eye(s_xx.shape[0])

    def inv_sqrt(s):
        u, sv, vt = np.linalg.svd(s + g * eye)
        return u @ np.diag(1.0 / np.sqrt(sv)) @ vt

    a, b = inv_sqrt(s_xx), inv_sqrt(s_yy)
    u, r, vt = np.linalg.svd(a @ s_xy @ b)
    t = np.linalg.inv(a) @ u @ vt @ b
    return t, np.linalg.inv(t), r


def cca_all_groups(widths=(512, 512, 1024), seed: int = 0) -> Workload:
    """CCA Merge transforms for every group of a model pair (correlated random statistics)."""
    from ..align import cca_transform

    rng = np.random.default_rng(seed)
    problems = []
    for c in widths:
        x = rng.normal(size=(4 * c, c)) * np.linspace(0.2, 2, c)
        y = x @ rng.normal(size=(c, c)) / np.sqrt(c) + 0.5 * rng.normal(size=(4 * c, c))
        xc, yc = x - x.mean(0), y - y.mean(0)
        n = len(x) - 1
        problems.append((xc.T @ xc / n, yc.T @ yc / n, xc.T @ yc / n))
    torch_problems = [tuple(torch.from_numpy(m) for m in p) for p in problems]

    def ours():
        for s_xx, s_yy, s_xy in torch_problems:
            cca_transform(s_xx, s_yy, s_xy, reg=0.1)

    def reference():
        for s_xx, s_yy, s_xy in problems:
            g = 0.1 * (np.diag(s_xx).mean() + np.diag(s_yy).mean()) / 2
            _three_svd_cca(s_xx, s_yy, s_xy, g)

    return Workload(name=f"CCA alignment of {len(widths)} groups ({'/'.join(map(str, widths))} units)",
                    group="merge", ours=ours, baseline=reference,
                    baseline_name="three-SVD formulation (numpy)", ratio_kind="time", target=2.0)


def gpt2_small_pair(seed: int = 0):
    """A GPT-2-small-shaped model (12 layers, d=768, vocab 50257), a random permutation of a copy,
    and its spec."""
    from .. import zoo
    from ..spec import trace_spec

    torch.manual_seed(seed)
    model = zoo.gpt2(vocab_size=50257, block_size=64, dim=768, depth=12, heads=12).eval()
    spec = trace_spec(model, (torch.randint(0, 50257, (1, 16)),))
    state = {k: v.detach() for k, v in model.state_dict().items()}
    permuted = spec.apply_permutations(state, spec.random_permutations(torch.Generator().manual_seed(seed + 1)))
    return spec, state, permuted


def reference_sweep(spec, target, state, perms: dict, groups) -> dict:
    """One coordinate-descent sweep the straightforward way: dense permutation matrices applied to
    every other axis of each member, float64 costs, scipy's assignment per group."""
    from scipy.optimize import linear_sum_assignment

    plain = {g.name: g for g in groups}
    axis_group = {}  # (tensor, axis) -> group name, for the plain groups
    for g in groups:
        for m in g.members:
            axis_group[(m.tensor, m.axis)] = g.name

    def dense(name):
        p = perms[name][0]
        mat = torch.zeros(len(p), len(p), dtype=torch.float64)
        mat[torch.arange(len(p)), p] = 1.0
        return mat

    for name, g in plain.items():
        cost = torch.zeros(g.size, g.size, dtype=torch.float64)
        for m in g.members:
            w0, w1 = target[m.tensor].double(), state[m.tensor].double()
            for axis in range(w1.dim()):
                other = axis_group.get((m.tensor, axis))
                if axis == m.axis or other is None:
                    continue
                w1 = torch.tensordot(dense(other), w1.movedim(axis, 0), dims=1).movedim(0, axis)
            a = w0.movedim(m.axis, 0).reshape(g.size, -1)
            b = w1.movedim(m.axis, 0).reshape(g.size, -1)
            cost += a @ b.T
        _, cols = linear_sum_assignment(cost.numpy(), maximize=True)
        perms[name] = torch.as_tensor(cols)[None]
    return perms
