"""The dtypes a merged checkpoint's floating tensors can be written in, by name (``--dtype``)."""

from __future__ import annotations

import torch

from ..errors import CheckpointError

# in the order the CLI lists them (fastmerge spec --input-dtype adds "long")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    """'bfloat16' -> torch.bfloat16; None (keep the inputs' dtypes) -> None."""
    if name is None:
        return None
    if name not in DTYPES:
        raise CheckpointError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]
