"""NaN/Inf counts of many tensors in one call: the guard every merge runs on its inputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _ext


def count_nonfinite(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """int64 tensor (on the CPU) with the number of NaN and Inf entries of each tensor; integer and
    boolean tensors count 0. CPU tensors go through the compiled kernel (bit tests at memory
    speed, several times faster than torch.isfinite); tensors elsewhere use torch on their device
    and are read back once."""
    tensors = list(tensors)
    if tensors and all(t.device.type == "cpu" for t in tensors) and _ext.load():
        return torch.ops.fastmerge.count_nonfinite([t.detach() for t in tensors])
    return count_nonfinite_reference(tensors)


def count_nonfinite_reference(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    counts = [(~torch.isfinite(t.detach())).sum() if t.is_floating_point()
              else torch.zeros((), dtype=torch.long, device=t.device) for t in tensors]
    if len({c.device for c in counts}) == 1:
        return torch.stack(counts).cpu()  # one read back
    return torch.stack([c.cpu() for c in counts]) if counts else torch.zeros(0, dtype=torch.long)
