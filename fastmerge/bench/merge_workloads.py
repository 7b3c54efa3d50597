"""Merge-pipeline benchmarks (issue 4): statistics overhead, CCA vs the three-SVD formulation,
weight matching on a GPT-2-small-shaped pair against a straightforward reference loop."""

from __future__ import annotations

import resource
import time

import numpy as np
import torch

from .. import zoo
from ..alignment import cca_transform
from ..merging.np_merge import CoefficientMerger
from ..spec import trace_spec
from ..spec.transforms import apply_permutations
from ..stats import collect_stats
from .workloads import Workload


def stats_overhead(width: int = 4, image: int = 32, batch: int = 32, batches: int = 2, seed: int = 0) -> Workload:
    """collect_stats for two ResNet-20xW models vs the plain forward passes over the same batches."""
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
    torch.manual_seed(seed)
    model = zoo.gpt2(vocab_size=50257, block_size=64, dim=768, depth=12, heads=12).eval()
    spec = trace_spec(model, (torch.randint(0, 50257, (1, 16)),))
    state = {k: v.detach() for k, v in model.state_dict().items()}
    permuted = apply_permutations(spec, state, spec.random_permutations(torch.Generator().manual_seed(seed + 1)))
    return spec, state, permuted


def reference_sweep(spec, target, state, perms: dict, groups) -> dict:
    """One coordinate-descent sweep the straightforward way: dense permutation matrices applied to
    every other axis of each member, float64 costs, scipy's assignment per group."""
    from scipy.optimize import linear_sum_assignment  # start-up time: 0.7 s for every CLI command otherwise

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


def np_merge_step(model: str = "resnet20x4", variant: str = "fastmerge", steps: int = 3, part: str = "step") -> dict:
    """Times NP Merge optimisation steps (merged weights, forward, backward, Adam) and measures the
    peak memory they add, for our fused combination or a straightforward implementation that
    materialises alpha * W_A + (1 - alpha) * W_B with per-tensor autograd operations. Run each
    variant in its own process (peak RSS is per process). part="merge" times the merging machinery
    alone (merged weights and the logit gradients for a fixed upstream gradient, no model)."""

    torch.manual_seed(0)
    if model == "resnet20x4":
        parents = [zoo.resnet20(in_channels=3, width=4).eval() for _ in range(2)]
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    elif model == "gpt2-small":
        parents = [zoo.gpt2(vocab_size=50257, block_size=64, dim=768, depth=12, heads=12).eval() for _ in range(2)]
        x = torch.randint(0, 50257, (1, 32))
        y = torch.randint(0, 50257, (1, 32))
    else:
        raise ValueError(model)
    template = parents[0]
    weights = [{k: v.detach() for k, v in p.named_parameters()} for p in parents]
    names = list(weights[0])
    buffers = dict(template.named_buffers())
    merger = CoefficientMerger(weights, names)
    opt = torch.optim.Adam(list(merger.logits.values()), lr=1e-2)

    if variant == "fastmerge":
        def merged():
            return merger.merged_params()
    else:
        def merged():  # per-tensor autograd: alpha * W_A + (1 - alpha) * W_B
            out = {}
            for k in names:
                alpha = torch.sigmoid(merger.logits[k][0])
                out[k] = alpha * weights[0][k] + (1 - alpha) * weights[1][k]
            return out

    upstream = {k: torch.randn_like(w) for k, w in weights[0].items()} if part == "merge" else None

    def step():
        if part == "merge":
            m = merged()
            grads = torch.autograd.grad([m[k] for k in names], [merger.logits[k] for k in names],
                                        [upstream[k] for k in names])
            del grads
            return
        out = torch.func.functional_call(template, {**merged(), **buffers}, (x,))
        loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()

    def rss_kb() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * (resource.getpagesize() // 1024)

    step()  # warm-up (allocator, Adam state)
    before = rss_kb()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"model": model, "variant": variant, "part": part, "seconds": min(times),
            "peak_added_mb": max(0, peak - before) / 1024,
            "params_millions": sum(w.numel() for w in weights[0].values()) / 1e6}
