"""What fastmerge needs from torch.distributed, in one place: whether a process group is active,
each rank's shard of the data, exact sums across ranks, and the set-up a torchrun launch expects.

fastmerge never starts its own workers: it joins the process group the caller (or torchrun) made.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Iterator, Sequence

import torch

from .errors import InvalidArgumentError


def active() -> bool:
    """True under an initialised process group."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if active() else 1


class Shard:
    """Every world_size-th batch of `data`, starting at this rank's index: the rank's part of a
    data pass. Iterable as often as `data` is (NP Merge cycles through its batches)."""

    def __init__(self, data: Iterable, rank: int, world_size: int) -> None:
        self.data, self.rank, self.world_size = data, rank, world_size

    def __iter__(self) -> Iterator:
        for i, batch in enumerate(self.data):
            if i % self.world_size == self.rank:
                yield batch

    def __len__(self) -> int:
        n = len(self.data)  # TypeError for iterables without a length, as for any iterable
        return max(0, (n - self.rank + self.world_size - 1) // self.world_size)


def shard(data: Iterable) -> Iterable:
    """This rank's batches of `data` (all of them without a process group)."""
    return Shard(data, rank(), world_size()) if active() else data


def all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> None:
    """Sums each tensor across ranks in place, with one collective (tensors flattened into one
    buffer of the widest dtype among them; float64 sums of float64 inputs stay exact to rounding)."""
    tensors = [t for t in tensors if t is not None]
    if not tensors or not active():
        return
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else tensors[0].dtype
    flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
    torch.distributed.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def init_from_environment(device: str = "cpu", timeout_s: float = 1800.0) -> bool:
    """Joins the process group a torchrun launch describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT in
    the environment): gloo for CPU, NCCL for CUDA (each rank on cuda:LOCAL_RANK). Returns True when
    it created the group (the caller then destroys it), False when there is nothing to join or a
    group already exists."""
    if active() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not torch.distributed.is_available():
        raise InvalidArgumentError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process")
    backend = "gloo"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InvalidArgumentError("device=cuda under torchrun, but no CUDA device is visible")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def rank_device(device: str) -> torch.device:
    """The device this rank computes on: cuda means cuda:LOCAL_RANK under torchrun."""
    if device == "cuda" and active():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(device)
