"""Fused TIES and DARE on one tensor of every model (fastmerge.merging.same_init calls these).

The compiled kernels (csrc/kernels/same_init.h) form each task vector W_k - base in float32 per
element and write the merged value in the output dtype: one read of every input and one write,
instead of several float32 temporaries per model. They take float32/float16/bfloat16 CPU tensors;
anything else (float64, CUDA tensors, no compiled library) runs the torch reference, which computes
the same float32 operations in the same order and the same DARE masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _ext
from .selection import magnitude_at_rank

FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DARE_DRAW_BITS = 24  # a DARE draw is a 24-bit integer: keep an entry when draw < density * 2^24
SELECT_SAMPLE = 1 << 16  # the most entries abs_delta_kth_largest samples (at most 1 in 32) for its window
CHUNK = 1 << 22  # elements per chunk of the reference: its float32 temporaries stay a few tens of MB
_M32 = 0xFFFFFFFF
_HASH_MULTIPLIER = 0x045D9F3B  # below 2^27: x * c fits in int64 for x < 2^32


def _fused(tensors: Sequence[torch.Tensor], out_dtype: torch.dtype) -> bool:
    dtype = tensors[0].dtype
    return (dtype in FUSED_DTYPES and out_dtype in FUSED_DTYPES and all(t.dtype == dtype for t in tensors)
            and all(t.device.type == "cpu" for t in tensors) and _ext.load())


def keep_below(density: float) -> int:
    """DARE keeps an entry when its draw is below this (density 1 keeps everything)."""
    return min(1 << DARE_DRAW_BITS, int(round(density * (1 << DARE_DRAW_BITS))))


def abs_delta_kth_largest(models: Sequence[torch.Tensor], base: torch.Tensor, k: int,
                          sample: int = SELECT_SAMPLE) -> list[float]:
    """The k-th largest |model - base| of every model (1 <= k <= numel), the difference taken in
    float32, exactly. The compiled op reads the base and every model once for all of them: a
    `sample` of entries narrows the select to a window (0: a radix select, more passes)."""
    return ties_thresholds(models, base, k, sample)[0]


def ties_thresholds(models: Sequence[torch.Tensor], base: torch.Tensor, k: int,
                    sample: int = SELECT_SAMPLE) -> tuple[list[float], list[int]]:
    """abs_delta_kth_largest, and how many entries of each |model - base| are NaN/Inf (where the
    model or the base is not finite), counted by the same pass."""
    if _fused([*models, base], torch.float32) and 1 <= k <= base.numel():
        thresholds, nonfinite = torch.ops.fastmerge.abs_delta_kth_largest(list(models), base, k, sample)
        return thresholds.tolist(), nonfinite.tolist()
    thresholds, nonfinite = [], []
    for m in models:  # one float32 task vector at a time
        delta = m.float() - base.float()
        thresholds.append(kth_largest_abs_reference(delta, k))
        nonfinite.append(int((~torch.isfinite(delta)).sum()))
    return thresholds, nonfinite


def ties_merge(models: Sequence[torch.Tensor], base: torch.Tensor, weights: Sequence[float],
               thresholds: Sequence[float], scale: float, out_dtype: torch.dtype | None = None,
               out: torch.Tensor | None = None, normalize: bool = True) -> torch.Tensor:
    """TIES on one tensor: each task vector trimmed to |W_k - base| >= thresholds[k], a sign elected
    per entry by sum_k weights[k] * trimmed_k (+ where that sum is >= 0, as mergekit elects it), the
    agreeing weighted entries summed and (normalize) divided by the sum of their weights; returns
    base + scale * that in `out_dtype` (default float32), written into `out` when it fits."""
    args = ([float(w) for w in weights], [float(t) for t in thresholds], float(scale), bool(normalize))
    return _run("ties_merge_out", args,
                lambda: ties_merge_reference(models, base, weights, thresholds, scale, normalize),
                models, base, out_dtype, out)


def dare_merge(models: Sequence[torch.Tensor], base: torch.Tensor, coefficients: Sequence[float],
               seeds: Sequence[int], density: float, out_dtype: torch.dtype | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """DARE on one tensor: base + sum_k coefficients[k] * keep_k * (W_k - base), entry i of model k
    kept when dare_draws(seeds[k]) < density * 2^24 (seeds: non-negative, below 2^63)."""
    args = ([float(c) for c in coefficients], [int(s) for s in seeds], keep_below(density))
    return _run("dare_merge_out", args, lambda: dare_merge_reference(models, base, coefficients, seeds, density),
                models, base, out_dtype, out)


def _run(op_name, args, reference, models, base, out_dtype, out) -> torch.Tensor:
    """The fused op `op_name`(models, base, *args, out) where it applies (into `out` when it fits),
    else reference() in the output dtype."""
    out_dtype = out_dtype or torch.float32
    if not _fused([*models, base], out_dtype):
        return reference().to(out_dtype)
    if out is None or out.shape != base.shape or out.dtype != out_dtype or not out.is_contiguous():
        out = torch.empty(base.shape, dtype=out_dtype, device=base.device)
    getattr(torch.ops.fastmerge, op_name)(list(models), base, *args, out)
    return out


def _hash32(x: torch.Tensor) -> torch.Tensor:
    x = ((x ^ (x >> 16)) * _HASH_MULTIPLIER) & _M32
    x = ((x ^ (x >> 16)) * _HASH_MULTIPLIER) & _M32
    return x ^ (x >> 16)


def dare_draws(seed: int, start: int, end: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """DARE's 24-bit draws (int64) of entries [start, end) for `seed`: the kernel's hash (compiled on
    the CPU, in torch elsewhere: dare_draws_reference)."""
    if torch.device(device).type == "cpu" and _ext.load():
        return _compiled_draws(seed, start, end).to(torch.int64)
    return dare_draws_reference(seed, start, end, device)


def _compiled_draws(seed: int, start: int, end: int) -> torch.Tensor:
    draws = torch.empty(end - start, dtype=torch.int32)
    torch.ops.fastmerge.dare_draws_out(start, seed, draws)
    return draws


def dare_draws_reference(seed: int, start: int, end: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """dare_draws in torch integer ops."""
    i = torch.arange(start, end, dtype=torch.int64, device=device)
    key = _hash32(_hash32((i >> 32) ^ (seed & _M32)) ^ ((seed >> 32) & _M32))  # one value per 2^32 entries
    return _hash32((i & _M32) ^ key) >> 8


def dare_keep(seed: int, start: int, end: int, density: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """DARE's keep mask (bool) of entries [start, end) for `seed`: dare_draws < keep_below(density)
    (compared on the compiled int32 draws on the CPU)."""
    if torch.device(device).type == "cpu" and _ext.load():  # by chunks: int32 draws of a few MB at a time
        keep = torch.empty(end - start, dtype=torch.bool)
        for s, e in _chunks(end - start):
            torch.lt(_compiled_draws(seed, start + s, start + e), keep_below(density), out=keep[s:e])
        return keep
    return dare_draws_reference(seed, start, end, device) < keep_below(density)


def kth_largest_abs_reference(values: torch.Tensor, k: int) -> float:
    """The k-th largest |value| (k >= 1) of a float32 tensor, exactly, by a radix select on the
    float32 bits (non-negative floats order like their bit patterns; selection.py): two bincounts."""
    return magnitude_at_rank(values, values.numel() - k)


def _chunks(n: int):
    for start in range(0, n, CHUNK):
        yield start, min(n, start + CHUNK)


def ties_merge_reference(models, base, weights, thresholds, scale, normalize: bool = True) -> torch.Tensor:
    """TIES in torch, chunk by chunk, in float32 (float64 for float64 inputs)."""
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    flat_b = base.reshape(-1)
    flat = [t.reshape(-1) for t in models]
    result = torch.empty(flat_b.numel(), dtype=dtype, device=base.device)
    for s, e in _chunks(flat_b.numel()):
        b = flat_b[s:e].to(dtype)
        trimmed = []
        for f, thr in zip(flat, thresholds):
            d = f[s:e].to(dtype) - b
            trimmed.append(torch.where(d.abs() >= thr, d, torch.zeros_like(d)))
        weighted = [w * d for w, d in zip(weights, trimmed)]
        elected = torch.zeros_like(b)
        for wd in weighted:  # summed in model order, as the kernel does
            elected += wd
        elected = torch.where(elected >= 0, 1.0, -1.0).to(dtype)  # a zero sum elects +, as in mergekit
        total = torch.zeros_like(b)
        count = torch.zeros_like(b)
        for w, wd in zip(weights, weighted):
            agree = torch.sign(wd) == elected
            total += torch.where(agree, wd, 0.0)
            count += torch.where(agree, float(w), 0.0).to(dtype)
        mixed = total / torch.where(count != 0, count, 1.0) if normalize else total
        result[s:e] = b + scale * mixed
    return result.reshape(base.shape)


def dare_merge_reference(models, base, coefficients, seeds, density) -> torch.Tensor:
    """DARE in torch, chunk by chunk, in float32 (float64 for float64 inputs), with the kernel's masks."""
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    flat_b = base.reshape(-1)
    flat = [t.reshape(-1) for t in models]
    below = keep_below(density)
    result = torch.empty(flat_b.numel(), dtype=dtype, device=base.device)
    for s, e in _chunks(flat_b.numel()):
        b = flat_b[s:e].to(dtype)
        acc = torch.zeros_like(b)
        for f, c, seed in zip(flat, coefficients, seeds):
            keep = dare_draws_reference(seed, s, e, base.device) < below
            acc += (f[s:e].to(dtype) - b) * keep * c
        result[s:e] = b + acc
    return result.reshape(base.shape)


def ties_threshold_count(numel: int, density: float) -> int:
    """How many entries of a task vector TIES keeps at `density`: int(density * numel), at least
    one, as mergekit counts them (entries tied with the smallest kept one are kept too)."""
    return max(1, int(density * numel))
