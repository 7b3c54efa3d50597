"""Merging methods for models that share a base (fine-tunes of one checkpoint), tensor by tensor
(../shared/ALGORITHMS.md section 8): linear, task arithmetic, TIES, DARE and SLERP.

Each works on one tensor of every model at a time, so checkpoints can be streamed
(fastmerge.merging.checkpoints). Linear combinations (linear, task arithmetic) run through the fused
combine op, TIES and DARE through their own fused ops (fastmerge.ops.same_init); all read 16-bit
weights directly and round once.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import InvalidArgumentError, NonFiniteError
from ..ops import combine
from ..ops.same_init import dare_merge, ties_merge, ties_threshold_count, ties_thresholds

METHODS = ("linear", "task_arithmetic", "ties", "dare", "slerp")
NEEDS_BASE = ("task_arithmetic", "ties", "dare")


@dataclass(frozen=True)
class SameInitOptions:
    """Options of the same-initialisation methods (shared by the API, the CLI and YAML configs).

    weights: one per model (linear: default uniform 1/n; task vectors: default 1 each).
    scale: lambda, the factor of the summed task vectors (task_arithmetic, ties, dare).
    density: fraction of each task vector kept (ties: the largest magnitudes, every entry tied
        with the smallest kept one included, so the choice is deterministic; bfloat16 task vectors
        take few distinct values and keep about a point more than `density` (51.2 % at 0.5 on a
        LLaMA-like checkpoint); dare: at random, survivors rescaled by 1/density).
    t: slerp's position from the first model (0) to the second (1).
    seed: dare's random masks (per model and tensor name, so reruns are bit-identical).
    """

    method: str = "linear"
    weights: tuple[float, ...] | None = None
    scale: float = 1.0
    density: float = 0.5
    t: float = 0.5
    seed: int = 0

    def validate(self, num_models: int, has_base: bool) -> None:
        if self.method not in METHODS:
            raise InvalidArgumentError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.method in NEEDS_BASE and not has_base:
            raise InvalidArgumentError(f"{self.method} needs the base model the others were fine-tuned from (--base)")
        if num_models < (2 if self.method in ("linear", "slerp") else 1):
            raise InvalidArgumentError(f"{self.method} needs at least {2 if self.method in ('linear', 'slerp') else 1} models")
        if self.method == "slerp" and num_models != 2:
            raise InvalidArgumentError(f"slerp interpolates exactly two models, got {num_models}")
        if self.weights is not None and len(self.weights) != num_models:
            raise InvalidArgumentError(f"got {len(self.weights)} weights for {num_models} models")
        if not 0.0 < self.density <= 1.0:
            raise InvalidArgumentError(f"density must be in (0, 1], got {self.density}")
        if not 0.0 <= self.t <= 1.0:
            raise InvalidArgumentError(f"t must be in [0, 1], got {self.t}")


def merge_tensor(name: str, tensors: Sequence[torch.Tensor], base: torch.Tensor | None,
                 options: SameInitOptions, out_dtype: torch.dtype | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """The merged value of one tensor, in `out_dtype` (default: the models' dtype). Linear methods,
    TIES and DARE write into `out` when it is given with the right shape and dtype (a buffer the
    caller reuses)."""
    out_dtype = out_dtype or tensors[0].dtype
    if out is not None and (out.shape != tensors[0].shape or out.dtype != out_dtype):
        out = None
    if not tensors[0].is_floating_point():  # integer buffers (position ids, counters): kept as they are
        return (base if base is not None else tensors[0]).to(out_dtype)
    if len({t.dtype for t in tensors} | ({base.dtype} if base is not None else set())) > 1:
        tensors = [t.float() for t in tensors]  # mixed precisions: combine in float32
        base = base.float() if base is not None else None
    n = len(tensors)
    method = options.method
    combine_out = None if out is None or out_dtype != tensors[0].dtype else [out]  # combine writes the models' dtype
    if method == "linear":
        weights = list(options.weights) if options.weights is not None else [1.0 / n] * n
        return combine([[t] for t in tensors], weights=weights, out=combine_out)[0].to(out_dtype)
    if method == "slerp":
        return _slerp(tensors[0], tensors[1], options.t).to(out_dtype)
    weights = list(options.weights) if options.weights is not None else [1.0] * n
    if method == "task_arithmetic":
        # base + s * sum_k w_k (W_k - base) as one fused combination
        coefs = [1.0 - options.scale * sum(weights)] + [options.scale * w for w in weights]
        return combine([[base]] + [[t] for t in tensors], weights=coefs, out=combine_out)[0].to(out_dtype)
    if method == "dare":
        coefs = [options.scale * w / options.density for w in weights]
        seeds = [_seed(options.seed, k, name) for k in range(n)]
        return dare_merge(tensors, base, coefs, seeds, options.density, out_dtype, out)
    # TIES: a threshold per model from the whole tensor (its `density` largest |task vector| entries)
    numel = base.numel()
    k = ties_threshold_count(numel, options.density)
    if options.density < 1.0 and numel:
        thresholds, nonfinite = ties_thresholds(tensors, base, k)
        if any(nonfinite):  # (the pass that selects the thresholds also checks the inputs)
            m = next(i for i, c in enumerate(nonfinite) if c)
            raise NonFiniteError(f"tensor {name!r}: {nonfinite[m]} entries of model {m}'s task vector (model - base) "
                                 "are NaN/Inf: a model or the base is broken there, or the difference overflows")
    else:
        thresholds = [0.0] * n
    return ties_merge(tensors, base, weights, thresholds, options.scale, out_dtype, out)


def checks_finite(options: SameInitOptions) -> bool:
    """Whether merge_tensor itself raises NonFiniteError for NaN/Inf inputs (TIES with trimming:
    its threshold pass counts them), so a caller need not check them first."""
    return options.method == "ties" and options.density < 1.0


def _seed(seed: int, model: int, name: str) -> int:
    return (seed * 1_000_003 + model * 7919 + zlib.crc32(name.encode())) % (2**63)


def _slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-6) -> torch.Tensor:
    a32, b32 = a.float(), b.float()
    na, nb = a32.norm(), b32.norm()
    if na == 0 or nb == 0:
        return (1 - t) * a32 + t * b32
    cos = float((a32.reshape(-1) @ b32.reshape(-1)) / (na * nb))
    if abs(cos) > 1 - eps:  # nearly parallel: the arc is a line
        return (1 - t) * a32 + t * b32
    omega = math.acos(max(-1.0, min(1.0, cos)))
    s = math.sin(omega)
    return (math.sin((1 - t) * omega) / s) * a32 + (math.sin(t * omega) / s) * b32
