"""Model Stock (Jang et al. 2024): the fine-tunes' average pulled toward the base by the angle
between their task vectors, t = n cos / (1 + (n - 1) cos) (cos: the mean pairwise cosine of the
task vectors, over the whole tensor, or per output row with filter_wise), out = t * average +
(1 - t) * base; the base is kept where 1 + (n - 1) cos vanishes.

The arithmetic is mergekit 0.1.5's, operation for operation and in the checkpoints' dtype, so a
config merged by both gives the same tensors to the bit (tests/io/test_mergekit_conformance.py)."""

import torch

from .base import SameInitMethod, register


def model_stock_tensor(tensors, base: torch.Tensor, filter_wise: bool = False) -> torch.Tensor:
    w_0, ws = base, list(tensors)
    if filter_wise:
        if w_0.dim() == 1:
            w_0, ws = w_0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w_0, ws = w_0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w_0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), (n * cos) / torch.where(singular, torch.ones_like(denominator),
                                                                             denominator))
    average = sum(ws) / n
    return (t * average + (1 - t) * w_0).reshape(base.shape)


def merge_model_stock(name, tensors, base, options, out_dtype, out):
    return model_stock_tensor(tensors, base, options.filter_wise).to(out_dtype)


register(SameInitMethod(name="model_stock", merge=merge_model_stock, needs_base=True, min_models=2,
                        uses=("filter_wise",)))
