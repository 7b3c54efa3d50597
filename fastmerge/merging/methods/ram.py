"""RAM (Reinforced Agent Merging) and RAM+ (tensor-local): the task vectors' entries above
`epsilon` in magnitude are summed where one model alone changed the entry and averaged over the
models that changed it where several did; RAM+ scales the unique part of each model by 1 + r *
min(alpha, its shared-to-unique entry ratio). mergekit 0.1.5's arithmetic, operation for
operation and in the checkpoints' dtype, to the bit."""

import torch

from .base import SameInitMethod, register


def _contributions(tensors, base: torch.Tensor, epsilon: float):
    """The flattened task vectors, which entries each model changed, and where one / several did."""
    rows = torch.stack([x - base for x in tensors], dim=0).view(len(tensors), -1)
    changed = rows.abs() > epsilon
    counts = changed.sum(dim=0, keepdim=True)
    return rows, changed, counts, counts > 1, counts == 1


def ram_tensor(tensors, base: torch.Tensor, epsilon: float = 1e-5, r: float | None = None,
               alpha: float = 0.2) -> torch.Tensor:
    rows, changed, counts, shared, unique = _contributions(tensors, base, epsilon)
    kept = rows * changed
    own = kept * unique
    if r is not None:  # RAM+: each model's unique part scaled by how much it also shares
        ratio = (changed & shared).sum(dim=1) / (changed & unique).sum(dim=1).clamp(min=epsilon)
        own = kept * unique * (1 + r * ratio.clamp(min=0, max=alpha)).unsqueeze(-1)
    merged = (own + kept * shared / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def merge_ram(name, tensors, base, options, out_dtype, out):
    return ram_tensor(tensors, base, options.threshold).to(out_dtype)


def merge_ramplus_tl(name, tensors, base, options, out_dtype, out):
    return ram_tensor(tensors, base, options.threshold, options.r, options.alpha).to(out_dtype)


register(SameInitMethod(name="ram", merge=merge_ram, needs_base=True, min_models=1, uses=("threshold",)))
register(SameInitMethod(name="ramplus_tl", merge=merge_ramplus_tl, needs_base=True, min_models=1,
                        uses=("threshold", "r", "alpha")))
