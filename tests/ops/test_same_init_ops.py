"""The fused TIES / DARE ops against their torch references and against plain definitions."""

import pytest
import torch

from fastmerge import _ext
from fastmerge.ops.same_init import (
    CHUNK,
    SELECT_SAMPLE,
    _hash32,
    abs_delta_kth_largest,
    dare_draws,
    dare_draws_reference,
    dare_keep,
    dare_merge,
    dare_merge_reference,
    keep_below,
    kth_largest_abs_reference,
    ties_merge,
    ties_merge_reference,
    ties_thresholds,
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


def sorted_abs_deltas(tunes, base):
    return [(t.float() - base.float()).abs().double().sort(descending=True).values for t in tunes]


def assert_kth_largest_exact(tunes, base, ks, samples=(SELECT_SAMPLE, 0)):
    """Every model's k-th largest |delta| for each k, in one call for all models, equal to sorting,
    with the sampled window (default) and with the radix select alone (sample=0)."""
    ordered = sorted_abs_deltas(tunes, base)
    for k in ks:
        want = [float(o[k - 1]) for o in ordered]
        for sample in samples:
            assert abs_delta_kth_largest(tunes, base, k, sample) == want, (k, sample)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kth_largest_matches_sorting(gen, dtype):
    base, tunes = family(gen, dtype)
    n = base.numel()
    assert_kth_largest_exact(tunes, base, (1, 2, 1000, 100_000, n - 1, n))
    ordered = sorted_abs_deltas(tunes[:1], base)[0]
    for k in (1, 1000, n):
        assert kth_largest_abs_reference(tunes[0].float() - base.float(), k) == float(ordered[k - 1]), k


def test_kth_largest_of_small_tensors_selects_from_all_keys(gen):
    base, tunes = family(gen, torch.bfloat16, n=5000)
    assert_kth_largest_exact(tunes, base, (1, 17, 2500, 4999, 5000))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kth_largest_of_large_tensors_matches_sorting(gen, dtype):
    """Several parallel parts, every histogram bin of the radix pass in use somewhere."""
    n = (1 << 21) + 5
    base = torch.randn(n, generator=gen).to(dtype)
    tunes = [(base.float() + s * torch.randn(n, generator=gen)).to(dtype) for s in (0.01, 0.03)]
    assert_kth_largest_exact(tunes, base, (1, 7, n // 10, n // 2, n - 3, n))


def test_kth_largest_with_a_small_sample_and_a_wide_window(gen):
    """A sample of 1024 entries (the fewest): wide windows, many keys collected, still exact."""
    n = (1 << 20) + 3
    base = torch.randn(n, generator=gen)
    tunes = [base + 0.01 * torch.randn(n, generator=gen)]
    assert_kth_largest_exact(tunes, base, (1, n // 3, n), samples=(1024, 4096))


def sampled_positions(n, sample):
    """The entries the op samples (csrc/cpu/same_init.cpp, sample_keys): min(sample, n / 32) of
    them, one per stratum of n / that entries, at a hashed offset inside it."""
    sample = min(sample, n // 32)
    j = torch.arange(sample, dtype=torch.int64)
    start = j * n // sample
    stride = (j + 1) * n // sample - start
    return start + _hash32(j) % stride


def test_kth_largest_when_the_sample_misleads_the_window(gen):
    """Every sampled entry made large and every other one small: the window drawn from the sample
    holds no k-th largest, and the op must notice and fall back to the radix select, exact."""
    n = (1 << 21) + 7
    base = torch.randn(n, generator=gen)
    delta = 0.01 * torch.rand(n, generator=gen)
    delta[sampled_positions(n, SELECT_SAMPLE)] = 1.0
    tunes = [base + delta, base - delta]
    assert_kth_largest_exact(tunes, base, (n // 2, n // 5, n // 32 + 1), samples=(SELECT_SAMPLE,))


def test_kth_largest_when_the_window_is_flooded(gen):
    """Sampled entries spread over [0.5, 1.5], all others packed just above 1: the window drawn
    around the sample's median holds nearly every entry, more than the pass collects, and the op
    falls back to the radix select, exact."""
    n = (1 << 21) + 7
    base = torch.zeros(n)
    delta = 1.0 + 1e-4 * torch.rand(n, generator=gen)
    positions = sampled_positions(n, SELECT_SAMPLE)
    delta[positions] = 0.5 + torch.rand(len(positions), generator=gen)
    assert_kth_largest_exact([base + delta], base, (n // 2, n // 3), samples=(SELECT_SAMPLE,))


def test_kth_largest_of_large_heavily_tied_tensors(gen):
    """Most task-vector entries zero (ties): both sides of the tie boundary come out exact."""
    n = (1 << 21) + 1
    base = torch.randn(n, generator=gen)
    tune = base.clone()
    changed = torch.rand(n, generator=gen) < 0.1
    tune[changed] += torch.randn(int(changed.sum()), generator=gen) * 0.01
    quantised = base + ((tune - base) * 1000).round() / 1000  # few distinct values: ties at the window's ends
    m = int(changed.sum())
    assert_kth_largest_exact([tune, quantised], base, (m // 2, m, m + 1, n // 2, n))


@pytest.mark.parametrize("n, sample, dtype", [(5000, SELECT_SAMPLE, torch.float32),
                                              ((1 << 20) + 3, SELECT_SAMPLE, torch.float32),
                                              ((1 << 20) + 3, 0, torch.float32), (5000, 0, torch.float64)])
def test_the_threshold_pass_counts_non_finite_task_vector_entries(gen, n, sample, dtype):
    """From all keys (small), the window pass, the radix pass and the torch reference (float64)
    alike: NaN/Inf in a model or in the base (which every model's task vector then has) are
    counted; the thresholds stay exact."""
    base = torch.randn(n, generator=gen, dtype=dtype)
    tune = base + 0.01 * torch.randn(n, generator=gen, dtype=dtype)
    tune[5], tune[n // 2] = float("nan"), float("inf")
    base[7] = float("-inf")
    models = [tune, base.clone()]
    thresholds, nonfinite = ties_thresholds(models, base, n // 2, sample)
    assert nonfinite == [int((~torch.isfinite(m - base)).sum()) for m in models] == [3, 1]
    assert thresholds == [float(o[n // 2 - 1]) for o in sorted_abs_deltas(models, base)]
    finite = torch.randn(n, generator=gen, dtype=dtype)
    assert ties_thresholds([finite + 1.0], finite, 3, sample)[1] == [0]


def test_kth_largest_with_ties_and_a_zero_task_vector():
    base = torch.zeros(1000)
    tune = torch.tensor([0.5] * 10 + [0.25] * 990)
    assert abs_delta_kth_largest([tune, base.clone()], base, 10) == [0.5, 0.0]
    assert abs_delta_kth_largest([tune], base, 11) == [0.25]
    assert abs_delta_kth_largest([base.clone()], base, 500) == [0.0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_ties_fused_equals_reference_to_the_bit(gen, dtype, out_dtype):
    base, tunes = family(gen, dtype)
    weights = [1.0, 0.5, 2.0]
    k = base.numel() // 3
    thresholds = abs_delta_kth_largest(tunes, base, k)
    got = ties_merge(tunes, base, weights, thresholds, 0.8, out_dtype)
    want = ties_merge_reference(tunes, base, weights, thresholds, 0.8).to(out_dtype)
    assert got.dtype == out_dtype
    assert torch.equal(got, want)


def test_ties_follows_its_definition(gen):
    """Small case against the definition written entry by entry in float64."""
    base, tunes = family(gen, torch.float32, n=501)
    weights, scale = [1.0, 0.5, 2.0], 1.3
    thresholds = abs_delta_kth_largest(tunes, base, 200)
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
        torch.ops.fastmerge.ties_merge_out([base, torch.zeros(11)], base, [1.0, 1.0], [0.0, 0.0], 1.0, True, torch.empty(10))
    with pytest.raises(RuntimeError, match="out must be"):
        torch.ops.fastmerge.dare_merge_out([base], base, [1.0], [1], 5, torch.empty(9))
    with pytest.raises(RuntimeError, match="k must be"):
        torch.ops.fastmerge.abs_delta_kth_largest([base], base, 11)
    with pytest.raises(RuntimeError, match="models\\[1\\]"):
        torch.ops.fastmerge.abs_delta_kth_largest([base, torch.zeros(11)], base, 3)
    with pytest.raises(RuntimeError, match="weights"):
        torch.ops.fastmerge.ties_merge_out([base], base, [1.0, 2.0], [0.0], 1.0, True, torch.empty(10))


def test_opcheck(gen):
    base, tunes = family(gen, torch.bfloat16, n=1000)
    out = torch.empty(1000)
    torch.library.opcheck(torch.ops.fastmerge.abs_delta_kth_largest.default, (tunes, base, 10))
    torch.library.opcheck(torch.ops.fastmerge.ties_merge_out.default, (tunes, base, [1.0] * 3, [0.01] * 3, 1.0, True, out))
    torch.library.opcheck(torch.ops.fastmerge.dare_merge_out.default, (tunes, base, [1.0] * 3, [1, 2, 3], 1 << 23, out))
    rows = tunes[0].reshape(10, 100)
    torch.library.opcheck(torch.ops.fastmerge.magprune_keep_out.default,
                          (rows, 0.5, 0.1, 7, torch.empty(rows.shape, dtype=torch.bool)))


@pytest.mark.skipif(not _ext.load(), reason="the compiled engine did not load")
@pytest.mark.parametrize("start, end", [(0, 1), (0, 100_003), ((1 << 32) - 70_000, (1 << 32) + 50_000),
                                        (5, 2 * CHUNK + 7)])  # masks made by chunks
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_compiled_draws_and_masks_are_the_torch_hash(start, end, density):
    """The draws and masks of mergekit's DARE variants from the compiled hash: the same bits as the
    torch hash's (and so as dare_merge_out's), across a 2^32 boundary of the index too."""
    seed = 2**62 + 12345
    draws = torch.empty(end - start, dtype=torch.int32)
    torch.ops.fastmerge.dare_draws_out(start, seed, draws)
    assert torch.equal(draws.long(), dare_draws_reference(seed, start, end))
    assert torch.equal(dare_draws(seed, start, end), dare_draws_reference(seed, start, end))
    keep = dare_keep(seed, start, end, density)
    assert keep.dtype == torch.bool and keep.shape == (end - start,)
    assert torch.equal(keep, dare_draws_reference(seed, start, end) < keep_below(density))
