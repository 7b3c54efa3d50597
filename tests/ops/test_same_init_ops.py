"""The fused TIES / DARE ops against their torch references and against plain definitions."""

import pytest
import torch

from fastmerge.ops.same_init import (
    abs_delta_kth_largest,
    dare_draws,
    dare_merge,
    dare_merge_reference,
    keep_below,
    kth_largest_abs_reference,
    ties_merge,
    ties_merge_reference,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def family(gen, dtype, n=200_003, models=3):
    """A base and fine-tunes of it, with some entries left equal to the base (zero task vector)."""
    base = torch.randn(n, generator=gen)
    tunes = []
    for _ in range(models):
        t = base + 0.05 * torch.randn(n, generator=gen)
        untouched = torch.rand(n, generator=gen) < 0.1
        t[untouched] = base[untouched]
        tunes.append(t.to(dtype))
    return base.to(dtype), tunes


@pytest.mark.parametrize("dtype", DTYPES)
def test_kth_largest_matches_sorting(gen, dtype):
    base, (tune, *_) = family(gen, dtype)
    delta = (tune.float() - base.float()).abs().double()
    ordered = delta.sort(descending=True).values
    for k in (1, 2, 1000, 100_000, delta.numel() - 1, delta.numel()):
        assert abs_delta_kth_largest(tune, base, k) == float(ordered[k - 1]), k
        assert kth_largest_abs_reference(tune.float() - base.float(), k) == float(ordered[k - 1]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kth_largest_of_large_tensors_matches_sorting(gen, dtype):
    """Several parallel parts, every histogram bin of the high pass in use somewhere."""
    n = (1 << 21) + 5
    base = torch.randn(n, generator=gen).to(dtype)
    tune = (base.float() + 0.01 * torch.randn(n, generator=gen)).to(dtype)
    ordered = (tune.float() - base.float()).abs().double().sort(descending=True).values
    for k in (1, 7, n // 10, n // 2, n - 3, n):
        assert abs_delta_kth_largest(tune, base, k) == float(ordered[k - 1]), k


def test_kth_largest_when_the_sample_mispredicts_the_bin(gen):
    """The op predicts the k-th largest's histogram bin from a strided sample (every n/16384-th
    entry); entries at exactly those positions made tiny send the prediction to the wrong bins,
    and the op must fall back to a second pass and still be exact."""
    n = (1 << 21) + 7
    base = torch.randn(n, generator=gen)
    delta = 0.01 * torch.randn(n, generator=gen)
    delta[(torch.arange(1 << 14) * n) // (1 << 14)] = 1e-7
    tune = base + delta
    ordered = (tune - base).abs().double().sort(descending=True).values
    for k in (n // 2, n // 5):
        assert abs_delta_kth_largest(tune, base, k) == float(ordered[k - 1]), k


def test_kth_largest_of_large_heavily_tied_tensors(gen):
    """Most task-vector entries zero (ties): both sides of the tie boundary come out exact."""
    n = (1 << 21) + 1
    base = torch.randn(n, generator=gen)
    tune = base.clone()
    changed = torch.rand(n, generator=gen) < 0.1
    tune[changed] += torch.randn(int(changed.sum()), generator=gen) * 0.01
    ordered = (tune - base).abs().double().sort(descending=True).values
    for k in (int(changed.sum()) // 2, int(changed.sum()), int(changed.sum()) + 1, n // 2, n):
        assert abs_delta_kth_largest(tune, base, k) == float(ordered[k - 1]), k


def test_kth_largest_with_ties_and_a_zero_task_vector():
    base = torch.zeros(1000)
    tune = torch.tensor([0.5] * 10 + [0.25] * 990)
    assert abs_delta_kth_largest(tune, base, 10) == 0.5
    assert abs_delta_kth_largest(tune, base, 11) == 0.25
    assert abs_delta_kth_largest(base.clone(), base, 500) == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_ties_fused_equals_reference_to_the_bit(gen, dtype, out_dtype):
    base, tunes = family(gen, dtype)
    weights = [1.0, 0.5, 2.0]
    k = base.numel() // 3
    thresholds = [abs_delta_kth_largest(t, base, k) for t in tunes]
    got = ties_merge(tunes, base, weights, thresholds, 0.8, out_dtype)
    want = ties_merge_reference(tunes, base, weights, thresholds, 0.8).to(out_dtype)
    assert got.dtype == out_dtype
    assert torch.equal(got, want)


def test_ties_follows_its_definition(gen):
    """Small case against the definition written entry by entry in float64."""
    base, tunes = family(gen, torch.float32, n=501)
    weights, scale = [1.0, 0.5, 2.0], 1.3
    thresholds = [abs_delta_kth_largest(t, base, 200) for t in tunes]
    got = ties_merge(tunes, base, weights, thresholds, scale).double()
    for i in range(base.numel()):
        d = [float(t[i]) - float(base[i]) for t in tunes]
        d = [x if abs(x) >= thr else 0.0 for x, thr in zip(d, thresholds)]
        elected = sum(w * x for w, x in zip(weights, d))
        agree = [(w, x) for w, x in zip(weights, d) if x != 0 and elected != 0 and (x > 0) == (elected > 0)]
        mean = sum(w * x for w, x in agree) / sum(w for w, _ in agree) if agree else 0.0
        assert got[i].item() == pytest.approx(float(base[i]) + scale * mean, rel=1e-5, abs=1e-6), i


@pytest.mark.parametrize("dtype", DTYPES)
def test_dare_fused_equals_reference_to_the_bit(gen, dtype):
    base, tunes = family(gen, dtype)
    coefficients, seeds = [0.7, 1.1, -0.4], [5, 2**40 + 3, 2**62 + 11]
    got = dare_merge(tunes, base, coefficients, seeds, 0.3, torch.bfloat16)
    want = dare_merge_reference(tunes, base, coefficients, seeds, 0.3).to(torch.bfloat16)
    assert torch.equal(got, want)


def test_dare_keeps_the_density_and_rescales_the_survivors(gen):
    base, (tune, *_) = family(gen, torch.float32)
    got = dare_merge([tune], base, [1 / 0.3], [17], 0.3)
    delta, full = got - base, tune - base
    kept = (delta != 0) & (full != 0)
    assert abs(float(kept.sum()) / float((full != 0).sum()) - 0.3) < 0.01
    torch.testing.assert_close(delta[kept], full[kept] / 0.3, rtol=1e-5, atol=1e-6)
    assert torch.equal(dare_merge([tune], base, [1.0], [17], 1.0), tune)  # density 1 keeps everything


def python_hash32(x):
    for _ in range(2):
        x = ((x ^ (x >> 16)) * 0x045D9F3B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_dare_draws_are_the_hash_at_any_index_and_independent_of_chunking():
    seed = 2**45 + 12345
    start = 2**32 - 5  # across the 32-bit boundary of the index
    draws = dare_draws(seed, start, start + 10)
    for j, i in enumerate(range(start, start + 10)):
        key = python_hash32(python_hash32((i >> 32) ^ (seed & 0xFFFFFFFF)) ^ (seed >> 32))
        assert int(draws[j]) == python_hash32((i & 0xFFFFFFFF) ^ key) >> 8
    whole = dare_draws(seed, 0, 100_000)
    assert torch.equal(torch.cat([dare_draws(seed, 0, 40_000), dare_draws(seed, 40_000, 100_000)]), whole)


def test_dare_draws_are_uniform_and_differ_between_seeds():
    a, b = dare_draws(1, 0, 1 << 20), dare_draws(2, 0, 1 << 20)
    counts = torch.bincount(a >> 20, minlength=16).double()  # 16 equal bins of the 24-bit range
    assert float((counts / counts.mean() - 1).abs().max()) < 0.02
    keep_a, keep_b = (a < keep_below(0.5)).double(), (b < keep_below(0.5)).double()
    assert abs(float(torch.corrcoef(torch.stack([keep_a, keep_b]))[0, 1])) < 0.01
    assert keep_below(1.0) == 1 << 24 and keep_below(0.0) == 0


def test_bad_arguments_raise():
    base = torch.zeros(10)
    with pytest.raises(RuntimeError, match="models\\[1\\]"):
        torch.ops.fastmerge.ties_merge_out([base, torch.zeros(11)], base, [1.0, 1.0], [0.0, 0.0], 1.0, torch.empty(10))
    with pytest.raises(RuntimeError, match="out must be"):
        torch.ops.fastmerge.dare_merge_out([base], base, [1.0], [1], 5, torch.empty(9))
    with pytest.raises(RuntimeError, match="k must be"):
        torch.ops.fastmerge.abs_delta_kth_largest(base, base, 11)
    with pytest.raises(RuntimeError, match="weights"):
        torch.ops.fastmerge.ties_merge_out([base], base, [1.0, 2.0], [0.0], 1.0, torch.empty(10))


def test_opcheck(gen):
    base, tunes = family(gen, torch.bfloat16, n=1000)
    out = torch.empty(1000)
    torch.library.opcheck(torch.ops.fastmerge.abs_delta_kth_largest.default, (tunes[0], base, 10))
    torch.library.opcheck(torch.ops.fastmerge.ties_merge_out.default, (tunes, base, [1.0] * 3, [0.01] * 3, 1.0, out))
    torch.library.opcheck(torch.ops.fastmerge.dare_merge_out.default, (tunes, base, [1.0] * 3, [1, 2, 3], 1 << 23, out))
