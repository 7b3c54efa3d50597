"""Model Stock (Jang et al. 2024): the fine-tunes' average pulled toward the base by the angle
between their task vectors: t = n cos / (1 + (n - 1) cos), cos the mean pairwise cosine of the
task vectors (over the whole tensor, or per output row with filter_wise), out = t * average +
(1 - t) * base; where 1 + (n - 1) cos vanishes the base is kept.

Per tensor (the default) the cosines come from the task vectors' Gram matrix in float64 and one
fused pass writes t / n * sum(models) + (1 - t) * base (methods/span.py); mergekit rounds the task
vectors, the average and the result to the checkpoints' dtype. filter_wise and --mergekit-compat run
mergekit 0.1.5's operations (bit-equal; tests/io/test_mergekit_conformance.py)."""

import itertools

import torch

from .base import SameInitMethod, register
from .span import check_finite, combination, gram, mergekit_difference


def _ratio(cos: torch.Tensor, n: int) -> torch.Tensor:
    """t = n cos / (1 + (n - 1) cos); 0 (the base) where the denominator vanishes."""
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    return torch.where(singular, torch.zeros_like(cos),
                       (n * cos) / torch.where(singular, torch.ones_like(denominator), denominator))


def model_stock_coefficients(grams: torch.Tensor) -> list[float]:
    """Each model's coefficient (t / n) in the merge, from the task vectors' Gram matrix."""
    n = grams.shape[0]
    norms = grams.diagonal().clamp(min=0).sqrt()
    cosines = [(grams[i, j] / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
               for i, j in itertools.combinations(range(n), 2)]
    return [float(_ratio(torch.stack(cosines).mean(), n)) / n] * n


def _mean_cosine(offsets) -> torch.Tensor:
    """The mean over pairs (in order) of the cosines of the task vectors, along the last dimension."""
    cosines = []
    for a, b in itertools.combinations(offsets, 2):
        scale = (torch.norm(a, dim=-1) * torch.norm(b, dim=-1)).clamp(min=1e-6)
        cosines.append(((a * b).sum(dim=-1) / scale).clamp(-1, 1))
    return torch.stack(cosines).mean(dim=0).unsqueeze(-1)


def model_stock_tensor(tensors, base: torch.Tensor, filter_wise: bool = False) -> torch.Tensor:
    """mergekit 0.1.5's model_stock, operation for operation in the tensors' dtype."""
    if not filter_wise:
        anchor, models = base.reshape(-1), [x.reshape(-1) for x in tensors]
    elif base.dim() == 1:
        anchor, models = base.unsqueeze(0), [x.unsqueeze(0) for x in tensors]
    else:
        anchor, models = base, list(tensors)
    cos = _mean_cosine([x - anchor for x in models])
    n = len(models)
    ratio = _ratio(cos, n)
    average = sum(models) / n
    return (ratio * average + (1 - ratio) * anchor).reshape(base.shape)


def merge_model_stock(name, tensors, base, options, out_dtype, out):
    if options.filter_wise or options.mergekit_compat:
        return model_stock_tensor(tensors, base, options.filter_wise).to(out_dtype)
    grams = gram(tensors, base)
    check_finite(name, grams)
    return combination(tensors, model_stock_coefficients(grams), base, out_dtype, out)


register(SameInitMethod(name="model_stock", merge=merge_model_stock, needs_base=True, min_models=2,
                        checks_finite=lambda options: not (options.filter_wise or options.mergekit_compat),
                        uses=("filter_wise", "mergekit_compat"),
                        mergekit_difference=lambda options, dtype: None if options.filter_wise
                        else mergekit_difference(options, dtype)))
