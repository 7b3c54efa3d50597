"""What merged units respond to: for units an alignment matched, the real inputs that activate
them most in each model, and an input synthesised to maximise them (activation maximisation), side
by side. This is the analysis that shows why permuted-and-averaged CNNs work: matched channels
detect the same pattern, and the merged channel still does.

Pass the models already aligned (model B permuted/transformed onto A: unit c of every model is then
one matched unit); fastmerge.eval.plots.plot_feature_grid draws the result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import InvalidArgumentError


@dataclass
class FeaturePictures:
    models: list[str]
    units: list[str]                       # a row label per unit: index and matched correlation
    unit_index: list[int]
    top_k: int
    top: dict = field(default_factory=dict)          # label -> [per unit: (k, *input_shape)]
    maximising: dict = field(default_factory=dict)   # label -> [per unit: input_shape]
    correlations: list[float] = field(default_factory=list)


def _unit_responses(model: nn.Module, layer: str, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """(N, C): the layer's output per input, averaged over spatial positions."""
    modules = dict(model.named_modules())
    if layer not in modules:
        raise InvalidArgumentError(f"layer {layer!r} is not a submodule of the model; "
                                   f"e.g. {[n for n in modules if n][:5]}")
    out = []

    def hook(module, args, output):
        y = output.detach().float()
        out.append(y.flatten(2).mean(-1) if y.dim() > 2 else y)

    handle = modules[layer].register_forward_hook(hook)
    mode = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch):
                model(x[i : i + batch])
    finally:
        handle.remove()
        model.train(mode)
    return torch.cat(out)


def maximise_unit(model: nn.Module, layer: str, unit: int, shape: Sequence[int], *, steps: int = 200,
                  lr: float = 0.05, l2: float = 1e-2, tv: float = 5e-2, value_range: tuple[float, float] = (-3.0, 3.0),
                  seed: int = 0) -> torch.Tensor:
    """An input (of `shape`, no batch axis) that maximises the unit's response (at the centre of a
    convolution's feature map), by gradient
    ascent from small noise with L2 and total-variation penalties and one-pixel jitter (the usual
    regularisers that keep the picture natural), clamped to `value_range`."""
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    x = (0.1 * torch.randn(1, *shape, generator=gen)).to(device).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    responses = []
    modules = dict(model.named_modules())
    # The unit's response at the centre of its feature map (a channel's mean over positions is
    # maximised by a flat image; the centre neuron shows the pattern in its receptive field).
    # Taken inside the hook: a following in-place ReLU would otherwise rewrite the output first.
    def centre(m, a, out):
        if out.dim() > 2:
            out = out[0, unit][tuple(size // 2 for size in out.shape[2:])]
        else:
            out = out[0, unit]
        responses.append(out.clone())  # a copy, not a view that the in-place ReLU would overwrite

    handle = modules[layer].register_forward_hook(centre)
    mode = model.training
    model.eval()
    try:
        for _ in range(steps):
            shift = torch.randint(-1, 2, (2,), generator=gen).tolist() if x.dim() >= 4 else [0, 0]
            jittered = torch.roll(x, shifts=shift, dims=(-2, -1)) if x.dim() >= 4 else x
            responses.clear()
            model(jittered)
            act = responses[-1]
            penalty = l2 * x.pow(2).mean()
            if x.dim() >= 4:
                penalty = penalty + tv * ((x[..., 1:, :] - x[..., :-1, :]).abs().mean()
                                          + (x[..., :, 1:] - x[..., :, :-1]).abs().mean())
            loss = -act + penalty
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                x.clamp_(*value_range)
    finally:
        handle.remove()
        model.train(mode)
    return x.detach()[0].cpu()


def feature_pictures(models: Mapping[str, nn.Module], layer: str, inputs: torch.Tensor, *,
                     units: Sequence[int] | None = None, num_units: int = 6, top_k: int = 4, steps: int = 200,
                     seed: int = 0) -> FeaturePictures:
    """Top-activating `inputs` and activation-maximising inputs of the same units of every model.

    Args:
        models: label -> model, aligned onto the first (unit c is one matched unit in all).
        layer: the module whose output channels/units to show (e.g. "features.3").
        inputs: real inputs (N, *input_shape) to rank, e.g. the test split.
        units: which units; default: the half best and half worst matched between the first two
            models (correlation of their responses over `inputs`), best first.
    """
    labels = list(models)
    if len(labels) < 1:
        raise InvalidArgumentError("feature_pictures needs at least one model")
    responses = {label: _unit_responses(m, layer, inputs) for label, m in models.items()}
    size = responses[labels[0]].shape[1]
    if len(labels) > 1:
        a, b = responses[labels[0]], responses[labels[1]]
        a, b = a - a.mean(0), b - b.mean(0)
        corr = (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0)).clamp_min(1e-12)
    else:
        corr = torch.zeros(size)
    if units is None:
        order = torch.argsort(corr, descending=True).tolist()
        best = order[: (num_units + 1) // 2]
        worst = [u for u in order[::-1] if u not in best][: num_units // 2][::-1]
        units = best + worst
    units = [int(u) for u in units]
    if any(not 0 <= u < size for u in units):
        raise InvalidArgumentError(f"units must lie in [0, {size}) for layer {layer!r}, got {units}")
    pictures = FeaturePictures(labels, [f"unit {u}\nr={float(corr[u]):.2f}" for u in units], units, top_k,
                               correlations=[float(corr[u]) for u in units])
    lo, hi = float(inputs.min()), float(inputs.max())
    for label, model in models.items():
        pictures.top[label] = [inputs[torch.argsort(responses[label][:, u], descending=True)[:top_k]] for u in units]
        pictures.maximising[label] = [maximise_unit(model, layer, u, inputs.shape[1:], steps=steps, seed=seed,
                                                    value_range=(lo, hi)) for u in units]
    return pictures
