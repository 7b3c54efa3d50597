"""After the merge: BatchNorm statistics reset, and REPAIR.

REPAIR (ALGORITHMS.md section 7): for each unit of a merged layer the target mean and std are the
weighted averages of the parents' (mu* = sum w_k mu_k, sigma* = sum w_k sigma_k), each parent's
taken *in the merged basis*: its own output moments (mean mu, covariance Sigma, measured on the
parent itself) mapped through its alignment transform T, mean T mu and variances diag(T Sigma T^T).
(Measuring the aligned parents instead is right for permutations only: under CCA or ZipIt an
aligned parent is not the parent's function, and REPAIR towards it undoes the alignment.)

Two kinds of repair points (`repair_points`):
- a BatchNorm that reads a Linear/Conv (the spec's folds): its scale and shift become the targets
  (weight = sigma*, bias = mu*) and its running statistics are reset on data, so the merge's own
  normalisation lands every unit on its target. Residual streams are covered: every branch's
  BatchNorm is a point.
- a Linear/Conv that is the single producer of a group and has no such BatchNorm: the merged
  unit's mean and std are measured and an affine correction is folded into it:
  W <- (sigma*/sigma) W, b <- sigma*/sigma (b - mu) + mu*.
Each layer must be measured after the corrections before it; instead of one pass over the data per
layer, one pass corrects every layer on the fly with the batch's own statistics (BatchNorms in
train mode, the producers through hooks) while the population statistics accumulate: ResNet-20 x1
on 2048 MNIST images, 2 models: 10.4 -> 3.8 s (benchmarks/RESULTS.md).

The BN reset needs no REPAIR targets: an aligned BatchNorm network (Alignment.apply,
fastmerge.spec.folding.unfold_state) already carries each parent's BatchNorm moments mapped into
the merged basis as scale and shift, and the merge combines them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .. import distributed
from ..batches import iterate_batches, run_model
from ..errors import DataError
from ..spec.folding import mapped_moments, norm_tensors
from ..spec.types import Group, MergeSpec, NormFold
from ..stages import timed
from ..stats.outputs import ForwardHooks, OutputMoments, channel_dim

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
    return _correcting_pass(model, data, max_batches=max_batches, reset=True, producer_targets={})


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
    outs = [m for m in group.members if m.role in ("out", "gate") and not m.tensor.endswith(".bias")]
    modules = {m.tensor.rsplit(".", 1)[0] for m in outs}
    if len(modules) != 1 or any(m.factors is not None or m.axis != 0 for m in outs):
        return None
    path = modules.pop()
    module = dict(model.named_modules()).get(path)
    return path if isinstance(module, _PRODUCERS) else None


@dataclass(frozen=True)
class RepairPoint:
    """A module whose output REPAIR corrects: `path`, the spec group its units belong to, and the
    BatchNorm fold when it is a BatchNorm reading a Linear/Conv (None: a Linear/Conv producer)."""

    path: str
    group: str
    fold: NormFold | None = None


def repair_points(spec: MergeSpec, model: nn.Module) -> list[RepairPoint]:
    """Every folded BatchNorm (spec.folds) and every single producer of a group without one."""
    modules = dict(model.named_modules())
    owner = {(m.tensor, m.axis): g for g in spec.groups if g.count == 1 for m in g.members}
    points, folded = [], set()
    for f in spec.folds:
        g = owner.get((f.tensor("bias"), 0))
        if g is not None and isinstance(modules.get(f.norm), _BATCH_NORMS):
            points.append(RepairPoint(f.norm, g.name, f))
            folded.add(f.producer)
    for g in spec.groups:
        path = producer_of(g, model) if g.count == 1 else None
        if path is not None and f"{path}.weight" not in folded:
            points.append(RepairPoint(path, g.name))
    return points


def repair_paths(spec: MergeSpec, model: nn.Module) -> list[str]:
    """The modules REPAIR corrects (repair_points' paths)."""
    return [p.path for p in repair_points(spec, model)]


def measure_moments(models: Sequence[nn.Module], points: Sequence[RepairPoint], data: Iterable,
                    max_batches: int | None = None) -> list[dict]:
    """Each model's output moments ({path: (mean, covariance)}) at the points, one pass over `data`."""
    modes = [m.training for m in models]
    try:
        with OutputMoments(models, [p.path for p in points]) as moments, torch.no_grad():
            for m in models:
                m.eval()
            for index, batch in enumerate(iterate_batches(data, max_batches=max_batches)):
                for m in models:
                    run_model(m, batch, index)
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    return moments.result()


def repair_targets(points: Sequence[RepairPoint], moments: Sequence[dict], transforms: Sequence[dict | None],
                   weights: Sequence[float]) -> dict:
    """{path: (mu*, sigma*)}: the weighted average of every parent's moments mapped into the merged
    basis by its transform of the point's group (transforms[k] None: parent k is already in it)."""
    targets = {}
    for p in points:
        if any(p.path not in m for m in moments):
            continue
        parts = [mapped_moments(*m[p.path], None if t is None else t.get(p.group)) for m, t in zip(moments, transforms)]
        targets[p.path] = (sum(w * mu for w, (mu, _) in zip(weights, parts)),
                           sum(w * sd for w, (_, sd) in zip(weights, parts)))
    return targets


def set_norm_targets(state: dict, points: Sequence[RepairPoint], targets: Mapping) -> dict:
    """A state whose folded BatchNorms output their target moments: weight sigma*, bias mu* (the
    running statistics stay for a reset to recompute)."""
    out = dict(state)
    for p in points:
        if p.fold is None or p.path not in targets:
            continue
        bn = norm_tensors(p.fold)
        mean, std = targets[p.path]
        out[bn["weight"]] = std.to(state[bn["weight"]])
        out[bn["bias"]] = mean.to(state[bn["bias"]])
    return out


def _correction(mean: torch.Tensor, std: torch.Tensor, target_mean: torch.Tensor, target_std: torch.Tensor):
    """(scale, shift) that move units of (mean, std) to (target_mean, target_std); dead units stay."""
    alive = std > 1e-8 * max(float(std.max()), 1e-300)
    scale = torch.where(alive, target_std / std.clamp_min(1e-300), torch.ones_like(std))
    shift = torch.where(alive, target_mean - scale * mean, torch.zeros_like(mean))
    return scale, shift


class UnitMoments(ForwardHooks):
    """While active, forward hooks accumulate each producer's per-unit output moments (count, sum,
    sum of squares, float64) for every model's forward passes; result() gives (mean, std) per model
    and path, over every rank's passes under torch.distributed.

    With `targets` ({path: (mean, std)}; one model), each producer's output is also moved to its
    target on the fly with the batch's own statistics, so every layer is measured on the corrected
    outputs of the layers before it: the whole network in one pass."""

    def __init__(self, models: Sequence[nn.Module], paths: Sequence[str], targets: dict | None = None) -> None:
        super().__init__(models, paths)
        self.targets = targets
        self.sums: list[dict] = [{p: None for p in self.paths} for _ in self.models]

    def _hook(self, i: int, p: str):
        def hook(module, args, out):
            dim = channel_dim(module, out)
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


@torch.no_grad()
def _correcting_pass(model: nn.Module, data: Iterable, *, max_batches: int | None, reset: bool,
                     producer_targets: dict) -> nn.Module:
    """One pass over `data`: with `reset` every BatchNorm recomputes its running statistics
    (cumulative average, train mode: it normalises with the batch's statistics, so the layers after
    it see corrected inputs), and each producer in `producer_targets` ({path: (mu*, sigma*)}) is
    moved to its target on the fly, its population moments accumulating; then the producers'
    corrections are folded into their weights. Everything else runs in eval mode; the model is
    left in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, _BATCH_NORMS)] if reset else []
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    seen = 0
    paths = list(producer_targets)
    try:
        with UnitMoments([model], paths, producer_targets) as moments:
            for index, batch in enumerate(iterate_batches(data, max_batches=max_batches)):
                run_model(model, batch, index)
                seen += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()
    if norms and distributed.active():
        seen = _combine_across_ranks(norms, seen)
    if norms and seen == 0:
        raise DataError("BatchNorm reset got no batches: its running statistics would be left at 0 and 1; "
                        "pass data")
    if paths:
        measured = moments.result()[0]
        modules = dict(model.named_modules())
        for path in paths:
            scale, shift = _correction(*measured[path], *producer_targets[path])
            layer = modules[path]
            w = layer.weight
            w.mul_(scale.to(w.dtype).view(-1, *([1] * (w.dim() - 1))))
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
            layer.bias.mul_(scale.to(w.dtype)).add_(shift.to(w.dtype))
    return model


@timed("REPAIR")
@torch.no_grad()
def repair(merged: nn.Module, parents: Sequence[nn.Module], spec: MergeSpec, data: Iterable, *,
           transforms: Sequence[dict | None] | None = None, weights: Sequence[float] | None = None,
           max_batches: int | None = None, parent_moments: Sequence[dict] | None = None) -> nn.Module:
    """REPAIR of `merged` in place (see the module docstring): every folded BatchNorm gets the
    targets as scale and shift and a reset, every other single producer an affine correction.

    Args:
        parents: the models merged, as they are (not aligned), with `transforms` their alignment
            transforms (Alignment.transforms); transforms None: the parents are already aligned
            (permuted: the merged basis is theirs).
        parent_moments: the parents' output moments at the repair points ([{path: (mean,
            covariance)}], e.g. gathered during the alignment's statistics pass), measured here
            when not given."""
    merged.eval()
    points = repair_points(spec, merged)
    if not points:
        return merged
    n = len(parents)
    weights = list(weights) if weights is not None else [1.0 / n] * n
    transforms = list(transforms) if transforms is not None else [None] * n
    if parent_moments is None:
        parent_moments = measure_moments(parents, points, data, max_batches)
    targets = repair_targets(points, parent_moments, transforms, weights)
    state = set_norm_targets(merged.state_dict(), points, targets)
    merged.load_state_dict(state)
    producers = {p.path: targets[p.path] for p in points if p.fold is None and p.path in targets}
    return _correcting_pass(merged, data, max_batches=max_batches, reset=has_batch_norm(merged),
                            producer_targets=producers)
