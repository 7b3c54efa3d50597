"""SCE (Wan et al. 2024): Select the entries where the task vectors vary most (select_topk of
them), Calculate each model's weight from its task vector's mean square, Erase the entries whose
sign disagrees with the weighted sum's, then the weighted mean of what is left. mergekit 0.1.5's
arithmetic, operation for operation and in the checkpoints' dtype, to the bit."""

import torch

from .base import SameInitMethod, register


def _select(task_vectors: torch.Tensor, fraction: float) -> torch.Tensor:
    if fraction <= 0:
        return torch.zeros_like(task_vectors[0])
    if fraction >= 1:
        return torch.ones_like(task_vectors[0])
    var = torch.var(task_vectors, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * fraction)
    mask = torch.zeros_like(var)
    if k:
        mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
    return mask


def _model_weights(task_vectors: torch.Tensor) -> torch.Tensor:
    weights = task_vectors.square().reshape(task_vectors.shape[0], -1).mean(dim=1)
    total = torch.sum(weights).item()
    return torch.ones_like(weights) / weights.shape[0] if abs(total) < 1e-6 else weights / total


def merge_sce(name, tensors, base, options, out_dtype, out):
    task_vectors = torch.stack([t - base for t in tensors], dim=0)
    if options.select_topk < 1:
        task_vectors = task_vectors * _select(task_vectors, options.select_topk).unsqueeze(0)
    elected = (task_vectors.sum(dim=0) >= 0).to(base.dtype) * 2 - 1
    keep = task_vectors.sign().to(base.dtype) == elected
    weights = _model_weights(task_vectors)
    while weights.dim() < task_vectors.dim():
        weights = weights.unsqueeze(-1)
    kept = weights * keep
    merged = (task_vectors * kept).sum(dim=0) / torch.sum(kept, dim=0).clamp(min=1e-6)
    return (base + merged).to(out_dtype)


register(SameInitMethod(name="sce", merge=merge_sce, needs_base=True, min_models=1, uses=("select_topk",)))
