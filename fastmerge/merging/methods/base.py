"""What a same-initialisation merge method is, and the registry of them (fastmerge.merging.METHODS).

A method merges one tensor of every model (and of the base they were fine-tuned from) at a time,
so checkpoints stream through it tensor by tensor (fastmerge.merging.checkpoints). The shared
work around it (integer buffers, mixed precisions, the output buffer) is done once in
fastmerge.merging.same_init.merge_tensor.

Adding a method: one module in this package that calls `register(SameInitMethod(...))`, imported by
the package's __init__; SameInitOptions, the CLI's choices and the checks take it from here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ...errors import InvalidArgumentError
from ...registry import Registry

# merge(name, tensors, base, options, out_dtype, out) -> the merged tensor (written into `out`
# when the method can and `out` is given)
TensorMerge = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class SameInitMethod:
    """A same-init method as the registry holds it.

    name: what the API, the CLI and YAML configs call it.
    merge: merges one tensor (see TensorMerge); tensors share one dtype when it is called.
    needs_base: whether it works on task vectors (model - base).
    min_models / max_models: how many models it merges (max None: any number).
    checks_finite: whether, for these options, `merge` itself raises NonFiniteError on NaN/Inf
        inputs (so callers need not check them first).
    uses: the SameInitOptions fields it reads, for plans and reports.
    mergekit_difference: for these options and the checkpoints' dtype, how the method computes
        otherwise than mergekit 0.1.5 does for the same config (None: it does not), so a mergekit
        user is told (fastmerge merge prints it; --mergekit-compat removes every difference)."""

    name: str
    merge: TensorMerge
    needs_base: bool = False
    min_models: int = 1
    max_models: int | None = None
    checks_finite: Callable[[object], bool] = lambda options: False
    uses: tuple[str, ...] = ("weights",)
    mergekit_difference: Callable[[object, torch.dtype], str | None] = lambda options, dtype: None

    def check_count(self, num_models: int) -> None:
        if num_models < self.min_models:
            raise InvalidArgumentError(f"{self.name} needs at least {self.min_models} models")
        if self.max_models is not None and self.max_models == self.min_models and num_models != self.min_models:
            raise InvalidArgumentError(f"{self.name} interpolates exactly {_WORDS.get(self.min_models, self.min_models)} "
                                       f"models, got {num_models}")
        if self.max_models is not None and num_models > self.max_models:
            raise InvalidArgumentError(f"{self.name} merges at most {self.max_models} models, got {num_models}")


_WORDS = {2: "two", 3: "three"}

METHODS: Registry[SameInitMethod] = Registry("same-init method")
register = METHODS.register
get_method = METHODS.lookup


def combine_target(out: torch.Tensor | None, out_dtype: torch.dtype, tensors: Sequence[torch.Tensor]):
    """`out` as the fused combine op's output list, when it can write there (it writes the models'
    dtype), else None."""
    return None if out is None or out_dtype != tensors[0].dtype else [out]


def task_weights(options, n: int) -> list[float]:
    """Per-model weights of the task vectors (default 1 each)."""
    return list(options.weights) if options.weights is not None else [1.0] * n
