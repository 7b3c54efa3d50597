"""Two-parent NP Merge in one fused op: ``out_t = sigmoid(l_t) * a_t + (1 - sigmoid(l_t)) * b_t``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _ext
from ..errors import ShapeMismatchError
from .combine import check_coefficient_shape


def sigmoid_merge(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], logits: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Merges two parents tensor by tensor with alpha = sigmoid(logit) kept by `a`.

    Args:
        a, b: the parents' tensors (same shapes and dtypes pairwise). Gradients do not flow to them.
        logits: float32/float64, per tensor: one value, the full shape, or leading axes with
            trailing 1s (per output channel); gradients flow to them.

    The forward keeps no intermediate of the weights' size and the backward recomputes alpha, so
    a training step needs the merged weights and the logit gradients only.
    """
    if not (len(a) == len(b) == len(logits)):
        raise ShapeMismatchError(f"sigmoid_merge: got {len(a)}, {len(b)} and {len(logits)} tensors")
    for t, (x, y, l) in enumerate(zip(a, b, logits)):
        if x.shape != y.shape or x.dtype != y.dtype:
            raise ShapeMismatchError(f"sigmoid_merge: tensor {t} has {tuple(x.shape)} {x.dtype} and {tuple(y.shape)} {y.dtype}")
        check_coefficient_shape(l, x, where=f"logits[{t}]")
    if _ext.load():
        return torch.ops.fastmerge.sigmoid_merge([x.detach() for x in a], [y.detach() for y in b], list(logits))
    _ext.warn_fallback()
    return [torch.sigmoid(l) * x.detach() + (1 - torch.sigmoid(l)) * y.detach() for x, y, l in zip(a, b, logits)]
