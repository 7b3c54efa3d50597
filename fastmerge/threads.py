"""One CPU thread for loops of tiny steps.

Training or NP Merge steps of a small fully connected model are many short operations; split over
two intra-op threads every one of them waits for the other thread, and on a machine with other work
running that wait is a time slice. Adam steps of MLPs, ms per step with 1 / 2 threads (2 cores):

    params x rows    idle          one core busy (`yes`)
    2.2e5            0.55 / 0.67   0.45 / 1.34
    7.6e6            1.51 / 1.07   1.06 / 3.38
    4.3e7            5.44 / 4.76   5.66 / 16.8     (the demo's MNIST MLP, batch 64)
    1.7e8            11.6 / 6.7    10.1 / 27.1

Up to the demo's MNIST MLP one thread loses at most 1.4x on an idle machine and gains about 3x on
a busy one, so such loops run on one thread. The rule depends on the model and the batch only,
never on the machine's load, so a rerun computes the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

# multiply-adds of one forward pass below which a step is "tiny" (params x rows of a dense model)
SMALL_STEP_MACS = 5e7
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_small_step(model: nn.Module, rows: int) -> bool:
    """Whether one forward pass of `model` on `rows` inputs is tiny: a CPU model without
    convolutions (whose work grows with the image, not the parameters) and params x rows below
    SMALL_STEP_MACS."""
    params = list(model.parameters())
    if any(p.device.type != "cpu" for p in params) or any(isinstance(m, _CONVS) for m in model.modules()):
        return False
    return sum(p.numel() for p in params) * rows <= SMALL_STEP_MACS


@contextmanager
def single_thread_if(small: bool) -> Iterator[None]:
    """torch's intra-op threads set to 1 inside the block when `small`, restored after."""
    if not small or torch.get_num_threads() == 1:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
