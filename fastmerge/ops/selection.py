"""Keep masks by rank without sorting: the entries whose rank, in the order of (|value|, position),
falls in a band [lo, hi). Model Breadcrumbs keeps such a band of each task vector; a full sort per
task vector (what mergekit runs) dominated that merge.

The rank's value comes from a radix select on the bit patterns (non-negative floats order like
their bits): one histogram for 16-bit floats, two for float32. Entries tied with the value at a
band edge are ranked by position, so the mask holds exactly hi - lo entries and does not depend on
a sort's implementation. NaNs rank above every number, as torch.sort places them."""

from __future__ import annotations

import torch

# the signed integer view of each float dtype whose non-negative values order like their bits
_KEY_DTYPES = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
_HALF_BITS = 16


def supports(dtype: torch.dtype) -> bool:
    """Whether band_mask can rank tensors of this dtype (float64 cannot: callers sort instead)."""
    return dtype in _KEY_DTYPES


def magnitude_keys(values: torch.Tensor) -> torch.Tensor:
    """|values| as non-negative integers (flat) that order as the magnitudes do."""
    return values.abs().reshape(-1).view(_KEY_DTYPES[values.dtype])


def _rank_in(counts: torch.Tensor, rank: int) -> tuple[int, int, int]:
    """The bin of a histogram holding ascending rank `rank` (0-based), how many entries lie in
    lower bins and how many in it."""
    cumulative = counts.cumsum(0)
    bin_ = int(torch.searchsorted(cumulative, torch.tensor(rank, dtype=cumulative.dtype), right=True))
    return bin_, int(cumulative[bin_ - 1]) if bin_ > 0 else 0, int(counts[bin_])


class _RadixSelect:
    """The key of any ascending rank among non-negative integer keys, how many keys are smaller and
    how many equal it: one bincount per 16 bits (the top half's histogram shared by every rank)."""

    def __init__(self, keys: torch.Tensor):
        self.keys = keys
        self.wide = keys.dtype == torch.int32
        self.high = keys >> _HALF_BITS if self.wide else keys
        self.counts = torch.bincount(self.high, minlength=1 << (_HALF_BITS - 1))

    def __call__(self, rank: int) -> tuple[int, int, int]:
        bin_, below, equal = _rank_in(self.counts, rank)
        if not self.wide:
            return bin_, below, equal
        low = (self.keys[self.high == bin_] & ((1 << _HALF_BITS) - 1)).to(torch.int32)
        low_bin, below_low, equal = _rank_in(torch.bincount(low, minlength=1 << _HALF_BITS), rank - below)
        return (bin_ << _HALF_BITS) | low_bin, below + below_low, equal


def magnitude_at_rank(values: torch.Tensor, rank: int) -> float:
    """The |value| of ascending rank `rank` (0-based), exactly (half-precision and float32 tensors)."""
    key = _RadixSelect(magnitude_keys(values))(rank)[0]
    bits = torch.tensor([key], dtype=torch.int32).to(_KEY_DTYPES[values.dtype])
    return float(bits.view(values.dtype))


def _add_ties(keep: torch.Tensor, keys: torch.Tensor, key: int, below: int, equal: int, lo: int, hi: int) -> None:
    """Sets in `keep` the entries equal to `key` (`equal` of them, ranked below + 0, 1, ... by
    position) whose rank is in [lo, hi)."""
    first, last = max(0, lo - below), min(equal, hi - below)
    if first == 0 and last == equal:
        keep |= keys == key  # every tie is inside the band
    elif first < last:
        keep[torch.nonzero(keys == key).squeeze(1)[first:last]] = True


def band_mask(values: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """A bool mask of `values`' shape: the entries of ascending rank lo <= r < hi by (|value|,
    position). Half-precision and float32 tensors (see supports)."""
    n = values.numel()
    lo, hi = max(0, lo), min(n, hi)
    if hi <= lo or lo == 0 and hi == n:
        return torch.full(values.shape, hi > lo, dtype=torch.bool, device=values.device)
    keys = magnitude_keys(values)
    select = _RadixSelect(keys)
    low_key, below_low, equal_low = select(lo)
    high_key, below_high, equal_high = select(hi - 1)
    keep = (keys > low_key) & (keys < high_key)
    _add_ties(keep, keys, low_key, below_low, equal_low, lo, hi)
    if high_key != low_key:
        _add_ties(keep, keys, high_key, below_high, equal_high, lo, hi)
    return keep.reshape(values.shape)

