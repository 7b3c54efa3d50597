"""After the merge: BatchNorm statistics reset, and REPAIR for networks without BatchNorm.

REPAIR (ALGORITHMS.md section 7): for each unit of a merged layer the target mean and std are the
weighted averages of the aligned parents' (mu* = sum w_k mu_k, sigma* = sum w_k sigma_k); the
merged unit's mean and std are measured on data and an affine correction is folded into the
producing layer: W <- (sigma*/sigma) W, b <- sigma*/sigma (b - mu) + mu*. Each layer must be measured
after the corrections before it; instead of one pass over the data per layer, one pass corrects
every layer on the fly with the batch's own statistics (what the REPAIR paper's code does with
BatchNorm layers in train mode) while the population statistics that are folded in accumulate:
ResNet-20 x1 on 2048 MNIST images, 2 models: 10.4 -> 3.8 s (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .. import distributed
from ..batches import iterate_batches, run_model
from ..errors import DataError
from ..spec.types import Group, MergeSpec
from ..stages import timed

_PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, _BATCH_NORMS) for m in model.modules())


@timed("BN reset")
@torch.no_grad()
def reset_batch_norm(model: nn.Module, data: Iterable, *, max_batches: int | None = None) -> nn.Module:
    """Recomputes every BatchNorm's running statistics on `data` (cumulative average, one pass in
    train mode); the affine parameters stay. The model is left in eval mode.

    Under a torch.distributed process group each rank passes its shard of the batches; the averages
    are then combined across ranks weighted by each rank's batch count, which is exactly the
    cumulative average over all the shards' batches, so every rank ends with the same statistics."""
    norms = [m for m in model.modules() if isinstance(m, _BATCH_NORMS)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    seen = 0
    for index, batch in enumerate(iterate_batches(data, max_batches=max_batches)):
        run_model(model, batch, index)
        seen += 1
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    if distributed.active():
        seen = _combine_across_ranks(norms, seen)
    if seen == 0:
        raise DataError("BatchNorm reset got no batches: its running statistics would be left at 0 and 1; "
                        "pass data")
    return model.eval()


def _combine_across_ranks(norms, seen: int) -> int:
    """Count-weighted average of the ranks' running statistics; returns the batches of all ranks."""
    device = next((b.device for m in norms for b in m.buffers()), torch.device("cpu"))  # NCCL: on the GPU
    sums = [(None, torch.tensor([float(seen)], dtype=torch.float64, device=device))]
    for m in norms:
        if m.running_mean is None:  # track_running_stats=False: nothing to reset
            continue
        n = m.num_batches_tracked.double()
        sums.append((m, torch.cat([n.view(1), m.running_mean.double() * n, m.running_var.double() * n])))
    distributed.all_reduce_sum_([s for _, s in sums])
    for m, s in sums[1:]:
        total, c = s[0], m.running_mean.numel()
        if total > 0:
            m.running_mean.copy_(s[1 : 1 + c] / total)
            m.running_var.copy_(s[1 + c :] / total)
            m.num_batches_tracked.fill_(int(total))
    return int(sums[0][1].item())


def producer_of(group: Group, model: nn.Module) -> str | None:
    """The single Linear/Conv module whose output rows are the group's units, if there is one."""
    outs = [m for m in group.members if m.role == "out"]
    modules = {m.tensor.rsplit(".", 1)[0] for m in outs}
    if len(modules) != 1 or any(m.factors is not None or m.axis != 0 for m in outs):
        return None
    path = modules.pop()
    module = dict(model.named_modules()).get(path)
    return path if isinstance(module, _PRODUCERS) else None


def _channel_dim(module: nn.Module) -> int:
    return 1 if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else -1


def _correction(mean: torch.Tensor, std: torch.Tensor, target_mean: torch.Tensor, target_std: torch.Tensor):
    """(scale, shift) that move units of (mean, std) to (target_mean, target_std); dead units stay."""
    alive = std > 1e-8 * max(float(std.max()), 1e-300)
    scale = torch.where(alive, target_std / std.clamp_min(1e-300), torch.ones_like(std))
    shift = torch.where(alive, target_mean - scale * mean, torch.zeros_like(mean))
    return scale, shift


class UnitMoments:
    """While active, forward hooks accumulate each producer's per-unit output moments (count, sum,
    sum of squares, float64) for every model's forward passes; result() gives (mean, std) per model
    and path, over every rank's passes under torch.distributed.

    With `targets` ({path: (mean, std)}; one model), each producer's output is also moved to its
    target on the fly with the batch's own statistics, so every layer is measured on the corrected
    outputs of the layers before it: the whole network in one pass."""

    def __init__(self, models: Sequence[nn.Module], paths: Sequence[str], targets: dict | None = None) -> None:
        self.models, self.paths, self.targets = list(models), list(paths), targets
        self.sums: list[dict] = [{p: None for p in self.paths} for _ in self.models]
        self._handles: list = []

    def __enter__(self) -> UnitMoments:
        for i, model in enumerate(self.models):
            modules = dict(model.named_modules())
            for p in self.paths:
                self._handles.append(modules[p].register_forward_hook(self._hook(i, p)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, i: int, p: str):
        def hook(module, args, out):
            dim = _channel_dim(module)
            x = out.detach().double().movedim(dim, -1)
            x = x.reshape(-1, x.shape[-1])
            acc = torch.stack([torch.full_like(x[0], x.shape[0]), x.sum(0), (x * x).sum(0)])
            self.sums[i][p] = acc if self.sums[i][p] is None else self.sums[i][p] + acc
            if self.targets is None:
                return None
            mean = acc[1] / acc[0]
            scale, shift = _correction(mean, (acc[2] / acc[0] - mean * mean).clamp_min(0).sqrt(), *self.targets[p])
            return (out.movedim(dim, -1) * scale.to(out.dtype) + shift.to(out.dtype)).movedim(-1, dim)

        return hook

    def seen(self) -> bool:
        """Whether every model ran (on this rank) while the hooks were active."""
        return all(acc is not None for per_model in self.sums for acc in per_model.values())

    def result(self) -> list[dict]:
        accumulated = [acc for per_model in self.sums for acc in per_model.values()]
        if any(acc is None for acc in accumulated):
            raise DataError("REPAIR got no batches (on this rank, under torch.distributed): give it data")
        distributed.all_reduce_sum_(accumulated)
        out = []
        for per_model in self.sums:
            stats = {}
            for p, acc in per_model.items():
                n, s, ss = acc[0], acc[1], acc[2]
                mean = s / n
                stats[p] = (mean, (ss / n - mean * mean).clamp_min(0).sqrt())
            out.append(stats)
        return out


def _unit_stats(models: Sequence[nn.Module], paths: Sequence[str], data, max_batches,
                targets: dict | None = None) -> list[dict]:
    """UnitMoments of `models` over one pass of `data` (see UnitMoments for `targets`)."""
    with UnitMoments(models, paths, targets) as moments, torch.no_grad():
        for index, batch in enumerate(iterate_batches(data, max_batches=max_batches)):
            for m in models:
                run_model(m, batch, index)
    return moments.result()


def repair_paths(spec: MergeSpec, model: nn.Module) -> list[str]:
    """The producers REPAIR corrects: one per group that has a single Linear/Conv producer."""
    return list(dict.fromkeys(path for g in spec.groups if (path := producer_of(g, model)) is not None))


def permuted_unit_stats(stats: dict, spec: MergeSpec, model: nn.Module, transforms: dict) -> dict | None:
    """A parent's REPAIR statistics ({path: (mean, std)}) mapped through its alignment, or None when
    a producer's group has a dense transform (its moments alone do not give the transformed ones)."""
    out = {}
    for g in spec.groups:
        path = producer_of(g, model)
        if path is None or path not in stats:
            continue
        t = transforms.get(g.name)
        if t is None:
            out[path] = stats[path]
        elif isinstance(t, torch.Tensor):  # (1, size) permutation: new unit u is old unit t[0, u]
            perm = t[0].to(stats[path][0].device)
            out[path] = (stats[path][0][perm], stats[path][1][perm])
        else:
            return None
    return out


@timed("REPAIR")
@torch.no_grad()
def repair(merged: nn.Module, aligned_parents: Sequence[nn.Module], spec: MergeSpec, data: Iterable, *,
           weights: Sequence[float] | None = None, max_batches: int | None = None,
           parent_stats: Sequence[dict] | None = None) -> nn.Module:
    """REPAIR of every group with a single Linear/Conv producer (see the module docstring).

    `parent_stats`: the aligned parents' per-unit (mean, std) at each producer when already known
    (merge() gathers them during the statistics pass of the alignment); measured here otherwise."""
    merged.eval()
    for p in aligned_parents:
        p.eval()
    paths = repair_paths(spec, merged)
    if not paths:
        return merged
    weights = list(weights) if weights is not None else [1.0 / len(aligned_parents)] * len(aligned_parents)
    if parent_stats is None:
        parent_stats = _unit_stats(aligned_parents, paths, data, max_batches)
    targets = {path: (sum(w * s[path][0] for w, s in zip(weights, parent_stats)),
                      sum(w * s[path][1] for w, s in zip(weights, parent_stats))) for path in paths}
    measured = _unit_stats([merged], paths, data, max_batches, targets=targets)[0]
    modules = dict(merged.named_modules())
    for path in paths:
        scale, shift = _correction(*measured[path], *targets[path])
        layer = modules[path]
        w = layer.weight
        w.mul_(scale.to(w.dtype).view(-1, *([1] * (w.dim() - 1))))
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
        layer.bias.mul_(scale.to(w.dtype)).add_(shift.to(w.dtype))
    return merged
