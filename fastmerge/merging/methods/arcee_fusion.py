"""Arcee Fusion: the base, with the other model's entries taken where their importance (|change|
times the KL divergence of the two rows' softmaxes) reaches a dynamic threshold (median + 1.5
times the interquartile range of the importances). mergekit 0.1.5's arithmetic, operation for
operation and in the checkpoints' dtype: bit-equal where a tensor has at most 10^6 entries; above
that mergekit estimates the quartiles on 10^6 entries drawn with torch's generator, fastmerge on
10^6 drawn with its own hashed draws, so those tensors differ by the sample (a config naming
arcee_fusion runs only with --own-masks)."""

import torch
import torch.nn.functional as F

from ...ops.same_init import dare_draws
from .base import SameInitMethod, register
from .dare import mask_seed

QUANTILE_SAMPLE = 1_000_000


def _importance(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    change = (model - base).abs()
    p = F.softmax(model, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    return change * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def _quartiles(values: torch.Tensor, seed: int) -> torch.Tensor:
    flat = values.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:  # a sample, with replacement, of fastmerge's draws
        picks = (dare_draws(seed, 0, QUANTILE_SAMPLE, flat.device) * flat.numel()) >> 24
        flat = flat[picks]
    ordered, _ = torch.sort(flat)
    return ordered[(torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()]


def merge_arcee_fusion(name, tensors, base, options, out_dtype, out):
    model = tensors[0]
    importance = _importance(model, base)
    q1, median, q3 = _quartiles(importance, mask_seed(options.seed, 0, name))
    chosen = (importance >= median + 1.5 * (q3 - q1)).float()
    return (base + (model - base) * chosen).to(out_dtype)


register(SameInitMethod(name="arcee_fusion", merge=merge_arcee_fusion, needs_base=True, min_models=1, max_models=1,
                        uses=("seed",)))
