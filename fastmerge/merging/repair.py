"""After the merge: BatchNorm statistics reset, and REPAIR for networks without BatchNorm.

REPAIR (ALGORITHMS.md section 7): for each unit of a merged layer the target mean and std are the
weighted averages of the aligned parents' (mu* = sum w_k mu_k, sigma* = sum w_k sigma_k); the
merged unit's mean and std are measured on data and an affine correction is folded into the
producing layer: W <- (sigma*/sigma) W, b <- sigma*/sigma (b - mu) + mu*. Layers are corrected in
forward order, each measured after the corrections before it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .. import distributed
from ..batches import iterate_batches
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
    for args, kwargs, _ in iterate_batches(data, max_batches=max_batches):
        model(*args, **kwargs)
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


def _unit_stats(models: Sequence[nn.Module], paths: Sequence[str], data, max_batches) -> list[dict]:
    """Per model and producer path: (mean, std) of every output unit, float64; under a process group,
    of the union of every rank's batches (the float64 sums are all-reduced)."""
    sums = [{p: None for p in paths} for _ in models]
    handles = []
    for i, model in enumerate(models):
        modules = dict(model.named_modules())
        for p in paths:
            def hook(module, args, out, i=i, p=p):
                x = out.detach().double().movedim(1 if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else -1, -1)
                x = x.reshape(-1, x.shape[-1])
                acc = torch.stack([torch.full_like(x[0], x.shape[0]), x.sum(0), (x * x).sum(0)])
                sums[i][p] = acc if sums[i][p] is None else sums[i][p] + acc
            handles.append(modules[p].register_forward_hook(hook))
    try:
        with torch.no_grad():
            for args, kwargs, _ in iterate_batches(data, max_batches=max_batches):
                for m in models:
                    m(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    accumulated = [acc for per_model in sums for acc in per_model.values()]
    if any(acc is None for acc in accumulated):
        raise DataError("REPAIR got no batches (on this rank, under torch.distributed): give it data")
    distributed.all_reduce_sum_(accumulated)
    out = []
    for per_model in sums:
        stats = {}
        for p, acc in per_model.items():
            n, s, ss = acc[0], acc[1], acc[2]
            mean = s / n
            stats[p] = (mean, (ss / n - mean * mean).clamp_min(0).sqrt())
        out.append(stats)
    return out


@timed("REPAIR")
@torch.no_grad()
def repair(merged: nn.Module, aligned_parents: Sequence[nn.Module], spec: MergeSpec, data: Iterable, *,
           weights: Sequence[float] | None = None, max_batches: int | None = None) -> nn.Module:
    """REPAIR of every group with a single Linear/Conv producer (see the module docstring)."""
    merged.eval()
    for p in aligned_parents:
        p.eval()
    paths = [path for g in spec.groups if (path := producer_of(g, merged)) is not None]
    paths = list(dict.fromkeys(paths))
    if not paths:
        return merged
    weights = list(weights) if weights is not None else [1.0 / len(aligned_parents)] * len(aligned_parents)
    parent_stats = _unit_stats(aligned_parents, paths, data, max_batches)
    modules = dict(merged.named_modules())
    for path in paths:  # spec order is forward order
        target_mean = sum(w * s[path][0] for w, s in zip(weights, parent_stats))
        target_std = sum(w * s[path][1] for w, s in zip(weights, parent_stats))
        mean, std = _unit_stats([merged], [path], data, max_batches)[0][path]
        alive = std > 1e-8 * max(float(std.max()), 1e-300)
        scale = torch.where(alive, target_std / std.clamp_min(1e-300), torch.ones_like(std))
        shift = torch.where(alive, target_mean - scale * mean, torch.zeros_like(mean))
        layer = modules[path]
        w = layer.weight
        w.mul_(scale.to(w.dtype).view(-1, *([1] * (w.dim() - 1))))
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
        layer.bias.mul_(scale.to(w.dtype)).add_(shift.to(w.dtype))
    return merged
