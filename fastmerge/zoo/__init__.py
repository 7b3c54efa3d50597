"""A small model zoo for tests, benchmarks and the merging demo.

Six ordinary PyTorch architectures at small default sizes (a CPU forward pass takes
milliseconds), each built by a factory with keyword-only size options from the current RNG
state::

    torch.manual_seed(0)
    model = fastmerge.zoo.ZOO["resnet20"](width=2).eval()
    logits = model(*fastmerge.zoo.example_inputs("resnet20"))

=============  ======================================  ===================================
name           input (default sizes)                   output
=============  ======================================  ===================================
``mlp``        float ``(B, 64)``                       ``(B, 10)``
``vgg``        float ``(B, 1, 8, 8)``                  ``(B, 10)``
``resnet20``   float ``(B, 1, 8, 8)``                  ``(B, 10)``
``vit``        float ``(B, 1, 8, 8)``                  ``(B, 10)``
``gpt2``       int64 ``(B, 16)`` ids in ``[0, 64)``    ``(B, 16, 64)``
``llama``      int64 ``(B, 16)`` ids in ``[0, 64)``    ``(B, 16, 64)``
=============  ======================================  ===================================

All models export with ``torch.export.export(model.eval(), args, strict=False)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import InvalidArgumentError
from .models import (
    GPT2,
    MLP,
    VGG,
    BasicBlock,
    Llama,
    ResNet20,
    ViT,
    gpt2,
    llama,
    mlp,
    resnet20,
    vgg,
    vit,
)

__all__ = [
    "GPT2",
    "MLP",
    "VGG",
    "ZOO",
    "BasicBlock",
    "Llama",
    "ResNet20",
    "ViT",
    "example_inputs",
    "gpt2",
    "llama",
    "mlp",
    "resnet20",
    "vgg",
    "vit",
]

ZOO: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "vgg": vgg,
    "resnet20": resnet20,
    "vit": vit,
    "gpt2": gpt2,
    "llama": llama,
}
"""Model name -> factory. Every factory takes only keyword options and has defaults for all."""

# Input of each model at its factory's default sizes: ("float", shape) or ("tokens", vocab, T).
_DEFAULT_INPUTS: dict[str, tuple] = {
    "mlp": ("float", (64,)),
    "vgg": ("float", (1, 8, 8)),
    "resnet20": ("float", (1, 8, 8)),
    "vit": ("float", (1, 8, 8)),
    "gpt2": ("tokens", 64, 16),
    "llama": ("tokens", 64, 16),
}


def example_inputs(
    name: str, batch: int = 2, *, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, ...]:
    """Example positional inputs for a zoo model built with its default sizes.

    Args:
        name: A key of :data:`ZOO`.
        batch: Batch size ``B``.
        generator: Source of randomness; ``None`` uses the global RNG.

    Returns:
        A 1-tuple, ready for ``model(*args)`` or ``torch.export.export(model, args)``:

        - ``mlp``: float32 ``(B, 64)`` standard normal.
        - ``vgg``, ``resnet20``, ``vit``: float32 ``(B, 1, 8, 8)`` standard normal.
        - ``gpt2``, ``llama``: int64 ``(B, 16)`` token ids uniform in ``[0, 64)``.

    Raises:
        InvalidArgumentError: ``name`` is not in :data:`ZOO` or ``batch`` is not a positive int.
    """
    if name not in _DEFAULT_INPUTS:
        raise InvalidArgumentError(
            f"unknown zoo model {name!r}; choose one of {sorted(ZOO)}"
        )
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise InvalidArgumentError(f"batch must be a positive int, got {batch!r}")
    kind, *rest = _DEFAULT_INPUTS[name]
    if kind == "float":
        (shape,) = rest
        return (torch.randn(batch, *shape, generator=generator),)
    vocab, seq_len = rest
    return (torch.randint(0, vocab, (batch, seq_len), generator=generator),)
