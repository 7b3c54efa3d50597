"""Model Stock (Jang et al. 2024): the fine-tunes' average pulled toward the base by the angle
between their task vectors: t = n cos / (1 + (n - 1) cos), cos the mean pairwise cosine of the
task vectors (over the whole tensor, or per output row with filter_wise), out = t * average +
(1 - t) * base; where 1 + (n - 1) cos vanishes the base is kept.

Written to agree with mergekit 0.1.5's model_stock to the bit (the same float operations in the
same order, in the checkpoints' dtype; tests/io/test_mergekit_conformance.py)."""

import itertools

import torch

from .base import SameInitMethod, register


def _mean_cosine(offsets) -> torch.Tensor:
    """The mean over pairs (in order) of the cosines of the task vectors, along the last dimension."""
    cosines = []
    for a, b in itertools.combinations(offsets, 2):
        scale = (torch.norm(a, dim=-1) * torch.norm(b, dim=-1)).clamp(min=1e-6)
        cosines.append(((a * b).sum(dim=-1) / scale).clamp(-1, 1))
    return torch.stack(cosines).mean(dim=0).unsqueeze(-1)


def model_stock_tensor(tensors, base: torch.Tensor, filter_wise: bool = False) -> torch.Tensor:
    if not filter_wise:
        anchor, models = base.reshape(-1), [x.reshape(-1) for x in tensors]
    elif base.dim() == 1:
        anchor, models = base.unsqueeze(0), [x.unsqueeze(0) for x in tensors]
    else:
        anchor, models = base, list(tensors)
    cos = _mean_cosine([x - anchor for x in models])
    n = len(models)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    ratio = torch.where(singular, torch.zeros_like(cos),
                        (n * cos) / torch.where(singular, torch.ones_like(denominator), denominator))
    average = sum(models) / n
    return (ratio * average + (1 - ratio) * anchor).reshape(base.shape)


def merge_model_stock(name, tensors, base, options, out_dtype, out):
    return model_stock_tensor(tensors, base, options.filter_wise).to(out_dtype)


register(SameInitMethod(name="model_stock", merge=merge_model_stock, needs_base=True, min_models=2,
                        uses=("filter_wise",)))
