"""Stage workloads of a 2-model merge of a small BatchNorm CNN on real 28x28 data: ResNet-20 x1,
2048 MNIST-5k images (8 batches of 256), the setting of the speed issue's targets.

    merge (permute / cca)  overhead   t(merge, statistics and BN reset included) / t(the forward passes it needs)
    REPAIR                 speed-up   t(one pass per layer: the previous implementation) / t(one pass)
    REPAIR vs BN reset     overhead   t(REPAIR) / t(BN reset)  (the issue's target: <= 2)
    spec cache             speed-up   t(trace_spec) / t(cached_trace_spec)
"""

from __future__ import annotations

import copy

import torch

from .. import zoo
from ..datasets import batches, load_dataset
from ..merging import merge
from ..merging.repair import _correction, _unit_stats, measure_moments, producer_of, repair, repair_points, reset_batch_norm
from ..spec import trace_spec
from ..spec.cache import cached_trace_spec
from .workloads import Workload


def small_cnn(width: int = 1, num_batches: int = 8, seed: int = 0):
    """Two ResNet-20 models of different initialisations, MNIST-5k fit batches and the spec."""
    split = load_dataset("mnist5k")
    inputs = batches(split.x_fit.view(-1, 1, 28, 28), 256)[:num_batches]
    models = []
    for s in range(2):
        torch.manual_seed(seed + s)
        models.append(zoo.resnet20(width=width).eval())
    return models, inputs, cached_trace_spec(models[0], (inputs[0],))


def _forwards(models, inputs, train: bool) -> None:
    with torch.no_grad():
        for m in models:
            m.train(train)
            for x in inputs:
                m(x)
            m.eval()


def merge_overhead(method: str = "permute") -> Workload:
    models, inputs, spec = small_cnn()
    scratch = copy.deepcopy(models[0])
    return Workload(
        name=f"2-model {method} merge, ResNet-20 x1 on 2048 MNIST images (statistics + BN reset)",
        group="small merges",
        ours=lambda: merge(models, method, data=inputs, spec=spec, progress=False),
        # what no implementation can skip: both parents over the data (statistics), the merge over it
        # in train mode (BN reset)
        baseline=lambda: (_forwards(models, inputs, train=False), _forwards([scratch], inputs, train=True)),
        baseline_name="the forward passes it needs",
        ratio_kind="overhead",
    )


def _repair_layer_by_layer(merged, parents, spec, data) -> None:
    """The previous REPAIR: one pass over the data per corrected layer, in forward order."""
    paths = list(dict.fromkeys(p for g in spec.groups if (p := producer_of(g, merged)) is not None))
    stats = _unit_stats(parents, paths, data, None)
    modules = dict(merged.named_modules())
    for path in paths:
        target = (sum(s[path][0] for s in stats) / len(stats), sum(s[path][1] for s in stats) / len(stats))
        scale, shift = _correction(*_unit_stats([merged], [path], data, None)[0][path], *target)
        layer = modules[path]
        with torch.no_grad():
            layer.weight.mul_(scale.to(layer.weight.dtype).view(-1, *([1] * (layer.weight.dim() - 1))))
            if layer.bias is None:
                layer.bias = torch.nn.Parameter(torch.zeros_like(scale, dtype=layer.weight.dtype))
            layer.bias.mul_(scale.to(layer.bias.dtype)).add_(shift.to(layer.bias.dtype))


def repair_passes() -> Workload:
    models, inputs, spec = small_cnn()
    merged, alignment = merge(models, "permute", data=inputs, spec=spec, repair_mode="none", return_alignment=True,
                              progress=False)
    return Workload(
        name="REPAIR of a 2-model ResNet-20 x1 merge, 2048 MNIST images: one pass vs a pass per layer",
        group="small merges",
        ours=lambda: repair(copy.deepcopy(merged), models, spec, inputs, transforms=alignment.transforms),
        baseline=lambda: _repair_layer_by_layer(copy.deepcopy(merged), models, spec, inputs),
        baseline_name="a pass over the data per layer (the previous REPAIR)",
        ratio_kind="time",
    )


def repair_vs_reset() -> Workload:
    models, inputs, spec = small_cnn()
    merged, alignment = merge(models, "permute", data=inputs, spec=spec, repair_mode="none", return_alignment=True,
                              progress=False)
    # the parents' moments, as merge() has them from the alignment's statistics pass
    moments = measure_moments(models, repair_points(spec, merged), inputs)
    return Workload(
        name="REPAIR (targets from the statistics pass, as in merge) vs BN reset, ResNet-20 x1, 2048 MNIST images",
        group="small merges",
        ours=lambda: repair(copy.deepcopy(merged), models, spec, inputs, transforms=alignment.transforms,
                            parent_moments=moments),
        baseline=lambda: reset_batch_norm(copy.deepcopy(merged), inputs),
        baseline_name="BN reset",
        ratio_kind="overhead",
        target=2.0,
    )


def spec_cache() -> Workload:
    models, inputs, _ = small_cnn()
    cached_trace_spec(models[1], (inputs[0],))
    return Workload(
        name="spec of ResNet-20 x1 (28x28): cached per architecture vs traced",
        group="small merges",
        ours=lambda: cached_trace_spec(models[1], (inputs[0],)),
        baseline=lambda: trace_spec(models[1], (inputs[0],)),
        baseline_name="trace_spec (torch.export + rules)",
        ratio_kind="time",
    )


WORKLOADS = (lambda: merge_overhead("permute"), lambda: merge_overhead("cca"), repair_passes, repair_vs_reset,
             spec_cache)
