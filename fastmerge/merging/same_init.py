"""Merging methods for models that share a base (fine-tunes of one checkpoint), tensor by tensor
(../shared/ALGORITHMS.md section 8): linear, task arithmetic, TIES, DARE and SLERP.

Each works on one tensor of every model at a time, so checkpoints can be streamed
(fastmerge.merging.checkpoints). Linear combinations (linear, task arithmetic) run through the fused
combine op, TIES and DARE through their own fused ops (fastmerge.ops.same_init); all read 16-bit
weights directly and round once. The methods themselves are one module each in
fastmerge/merging/methods/ (the registry METHODS); this module holds their shared options and the
work common to all of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import InvalidArgumentError
from .methods import METHODS, get_method

__all__ = ["METHODS", "SameInitOptions", "as_loaded", "checks_finite", "merge_tensor"]


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
    densities: ties: one density per model (mergekit's per-model `density`), overriding `density`.
    normalize: ties: divide the agreeing entries' sum by their weights' sum (default: yes);
        task_arithmetic: divide the weights by their sum (default: no). As mergekit's `normalize`.
    filter_wise: model_stock: one angle per output row instead of per tensor.
    gammas: breadcrumbs: per model, the fraction of largest task-vector entries dropped (default 0.01).
    rescale: breadcrumbs: rescale each sparsified task vector to its L1 norm (default: no).
    row_wise, flatten: nuslerp: interpolate each row (the first dimension), or the whole tensor
        (flatten, the default), else the last dimension; mergekit's nuslerp_row_wise / nuslerp_flatten.
    max_iter, tol: karcher: the most Riemannian steps, and the step length that stops them.
    eps: multislerp: added to each length it divides by, and the least length of the weighted mean
        direction (mergekit's eps, default 1e-8).
    select_topk: sce: the fraction of entries (those whose task vectors vary most) kept.
    epsilons: della: per model, the spread of the keep probability around the density (default 0.15).
    threshold, r, alpha: ram / ramplus_tl: the magnitude above which a task-vector entry counts as
        changed (mergekit's epsilon), and RAM+'s rescaling of the unique parts.
    mergekit_compat: compute as mergekit 0.1.5 does, operation for operation, where fastmerge computes
        otherwise (each method's mergekit_difference says how): TIES on bfloat16/float16 checkpoints
        (in their dtype, exactly k entries kept), the entries tied at the edges of breadcrumbs' bands
        (torch's sort order, not positions), slerp / model_stock / nuslerp / multislerp / karcher with
        mergekit's float operations (not from a float64 Gram matrix); bit-equal to mergekit
        (tests/io/test_mergekit_conformance.py), as slow.
    """

    method: str = "linear"
    weights: tuple[float, ...] | None = None
    scale: float = 1.0
    density: float = 0.5
    t: float = 0.5
    seed: int = 0
    densities: tuple[float, ...] | None = None
    normalize: bool | None = None
    mergekit_compat: bool = False
    filter_wise: bool = False
    gammas: tuple[float, ...] | None = None
    rescale: bool | None = None
    row_wise: bool | None = None
    flatten: bool | None = None
    max_iter: int = 10
    tol: float = 1e-5
    eps: float = 1e-8
    select_topk: float = 1.0
    epsilons: tuple[float, ...] | None = None
    threshold: float = 1e-5
    r: float = 0.1
    alpha: float = 0.2

    def validate(self, num_models: int, has_base: bool) -> None:
        method = get_method(self.method)
        if method.needs_base and not has_base:
            raise InvalidArgumentError(f"{self.method} needs the base model the others were fine-tuned from: "
                                       "pass base=PATH")
        method.check_count(num_models)
        if self.mergekit_compat and self.method == "dare":
            raise InvalidArgumentError("dare is fastmerge's own DARE (hashed masks): --mergekit-compat cannot make it "
                                       "mergekit's; mergekit's are dare_linear and dare_ties (their random masks "
                                       "differ from mergekit's draws anyway)")
        if self.weights is not None and len(self.weights) != num_models:
            raise InvalidArgumentError(f"got {len(self.weights)} weights for {num_models} models")
        if self.weights is not None and not all(math.isfinite(w) for w in self.weights):
            raise InvalidArgumentError(f"weights must be finite numbers, got {list(self.weights)}")
        if self.method == "linear" and self.weights is not None and sum(self.weights) == 0:
            raise InvalidArgumentError(f"linear weights {list(self.weights)} sum to 0: the merge would be a "
                                       "difference of models, not an average; give weights with a positive sum")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise InvalidArgumentError(f"seed must be an integer in [0, 2^63), got {self.seed!r}")
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, int) or not 0 <= self.max_iter <= 10_000:
            raise InvalidArgumentError(f"max_iter must be an integer in [0, 10000], got {self.max_iter!r}")
        if not 0.0 <= self.select_topk <= 1.0:
            raise InvalidArgumentError(f"select_topk must be in [0, 1], got {self.select_topk}")
        if not (math.isfinite(self.tol) and self.tol > 0):
            raise InvalidArgumentError(f"tol must be a positive number, got {self.tol}")
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise InvalidArgumentError(f"eps must be a number >= 0, got {self.eps}")
        if not math.isfinite(self.scale):
            raise InvalidArgumentError(f"scale (lambda) must be a finite number, got {self.scale}")
        if not 0.0 < self.density <= 1.0:
            raise InvalidArgumentError(f"density must be in (0, 1], got {self.density}")
        for option in ("densities", "normalize", "filter_wise", "gammas", "rescale", "row_wise", "flatten", "epsilons"):
            if getattr(self, option) not in (None, False) and option not in method.uses:
                takers = ", ".join(m for m in METHODS if option in METHODS[m].uses)
                raise InvalidArgumentError(f"{option} applies to {takers}, not to {self.method}")
        if self.densities is not None:
            if len(self.densities) != num_models:
                raise InvalidArgumentError(f"got {len(self.densities)} densities for {num_models} models")
            if not all(isinstance(d, (int, float)) and 0.0 < d <= 1.0 for d in self.densities):
                raise InvalidArgumentError(f"every density must be in (0, 1], got {list(self.densities)}")
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
    compute = compute_dtype(tensors, base, out_dtype, options.mergekit_compat)
    if compute is not None:
        tensors = [t.to(compute) for t in tensors]
        base = base.to(compute) if base is not None else None
    return get_method(options.method).merge(name, tensors, base, options, out_dtype, out)


def compute_dtype(tensors: Sequence[torch.Tensor], base: torch.Tensor | None, out_dtype: torch.dtype,
                  mergekit_compat: bool = False) -> torch.dtype | None:
    """The dtype the inputs are converted to before a method runs, None to take them as they are.
    Mixed precisions combine in float32. An output more precise than every input (`--dtype
    float32` on bfloat16 models) is computed at the output's precision, not rounded to the inputs'
    dtype and then widened; except with `mergekit_compat`, where the inputs stay as mergekit loads
    them (in the config's `dtype`: as_loaded) and each method runs mergekit's arithmetic on them."""
    dtypes = {t.dtype for t in tensors} | ({base.dtype} if base is not None else set())
    if (not mergekit_compat and out_dtype.is_floating_point
            and all(torch.finfo(out_dtype).eps < torch.finfo(d).eps for d in dtypes)):
        return out_dtype
    return torch.float32 if len(dtypes) > 1 else None


def as_loaded(tensors: Sequence[torch.Tensor | None], dtype: torch.dtype | None) -> list[torch.Tensor | None]:
    """The tensors as mergekit loads them under a config's `dtype`: every floating one converted to
    it (rounded or widened) before any arithmetic; None (no `dtype`) keeps them as stored."""
    return [t.to(dtype) if dtype is not None and t is not None and t.is_floating_point() else t for t in tensors]


def checks_finite(options: SameInitOptions) -> bool:
    """Whether merge_tensor itself raises NonFiniteError for NaN/Inf inputs (TIES with trimming:
    its threshold pass counts them), so a caller need not check them first."""
    return get_method(options.method).checks_finite(options)
