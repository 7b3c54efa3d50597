"""CCA and ZipIt math, statistics collection, the merge API, BatchNorm reset and REPAIR."""

import copy

import numpy as np
import pytest
import torch

import fastmerge
import fastmerge.zoo as zoo
from fastmerge.alignment import cca_transform, zipit_matrices
from fastmerge.errors import InvalidArgumentError, NonFiniteError, ShapeMismatchError
from fastmerge.merging import reset_batch_norm
from fastmerge.spec import trace_spec
from fastmerge.stats import StatsCollector, tap_features


def correlated(gen, n=2000, c=12):
    """Two views of one latent: y = A x + noise, with A far from a permutation."""
    x = torch.randn(n, c, generator=gen, dtype=torch.float64) * torch.linspace(0.5, 2, c, dtype=torch.float64)
    a = torch.randn(c, c, generator=gen, dtype=torch.float64)
    y = x @ a.T + 0.3 * torch.randn(n, c, generator=gen, dtype=torch.float64)
    return x, y


def cov(a, b):
    a, b = a - a.mean(0), b - b.mean(0)
    return a.T @ b / (a.shape[0] - 1)


@pytest.mark.parametrize("reg", [0.0, 1e-3, 0.1, 10.0])
def test_cca_transform_and_its_inverse(gen, reg):
    x, y = correlated(gen)
    t, t_inv, r = cca_transform(cov(x, x), cov(y, y), cov(x, y), reg=reg)
    eye = torch.eye(x.shape[1], dtype=torch.float64)
    assert torch.allclose(t @ t_inv, eye, atol=1e-8) and torch.allclose(t_inv @ t, eye, atol=1e-8)
    assert (r >= -1e-12).all() and (r <= 1 + 1e-9).all()


def test_cca_limits(gen):
    x, y = correlated(gen)
    sxx, syy, sxy = cov(x, x), cov(y, y), cov(x, y)
    # g -> 0: exact CCA; the canonical correlations are those of the whitened cross-covariance,
    # and T maps y to the x-basis directions that best correlate with it
    _, _, r = cca_transform(sxx, syy, sxy, reg=0.0)
    wx = torch.linalg.inv(torch.linalg.cholesky(sxx))
    wy = torch.linalg.inv(torch.linalg.cholesky(syy))
    exact = torch.linalg.svdvals(wx @ sxy @ wy.T)
    assert torch.allclose(r, exact, atol=1e-8)
    # g -> inf: the orthogonal Procrustes rotation U V^T of S_xy
    t, _, _ = cca_transform(sxx, syy, sxy, reg=1e9)
    u, _, vh = torch.linalg.svd(sxy)
    assert torch.allclose(t, u @ vh, atol=1e-5)
    assert torch.allclose(t @ t.T, torch.eye(t.shape[0], dtype=torch.float64), atol=1e-5)
    # absolute regularisation is the relative one times the mean variance
    scale = float((sxx.diagonal().mean() + syy.diagonal().mean()) / 2)
    t_rel, _, _ = cca_transform(sxx, syy, sxy, reg=0.1)
    t_abs, _, _ = cca_transform(sxx, syy, sxy, reg=0.1 * scale, relative=False)
    assert torch.allclose(t_rel, t_abs, atol=1e-12)
    with pytest.raises(InvalidArgumentError):
        cca_transform(sxx, syy, sxy, reg=-1.0)


def test_zipit_pairs_matching_features_and_respects_beta():
    rng = np.random.default_rng(0)
    c, n = 6, 3
    base = rng.normal(size=(800, c))
    feats, perms = [], []
    for i in range(n):
        p = np.arange(c) if i == 0 else rng.permutation(c)
        perms.append(p)
        feats.append(base[:, p] + 0.01 * rng.normal(size=(800, c)))
    rho = np.corrcoef(np.concatenate(feats, 1).T)
    merge, unmerge = zipit_matrices(rho, n, c, alpha=0.5, beta=0.0)
    assert merge.shape == (c, n * c) and unmerge.shape == (n * c, c)
    assert np.allclose(merge.sum(1), 1) and np.allclose(unmerge.sum(1), 1)  # averages; one-hot
    for k in range(c):
        members = np.nonzero(unmerge[:, k])[0]
        originals = {int(perms[f // c][f % c]) for f in members}
        assert len(members) == n and len(originals) == 1, (k, members)  # one feature of each model
    # with a within-model budget, merges inside one model happen (at most the budget each)
    noisy = np.corrcoef(rng.normal(size=(800, n * c)).T)
    merge, unmerge = zipit_matrices(noisy, n, c, alpha=1.0, beta=1.0)
    assert np.allclose(unmerge.sum(1), 1) and merge.shape == (c, n * c)
    with pytest.raises(InvalidArgumentError):
        zipit_matrices(noisy, n, c, alpha=0.0)


def test_collect_stats_matches_a_direct_computation():
    torch.manual_seed(0)
    models = [zoo.mlp().eval(), zoo.mlp().eval()]
    spec = trace_spec(models[0], zoo.example_inputs("mlp"))
    data = [torch.randn(37, 64) for _ in range(3)]
    stats = fastmerge.collect_stats(models, data, spec, pairs="full", progress=False)
    group = spec.groups[0]  # first hidden layer, tapped at the second Linear's input
    x = torch.cat(data)
    feats = [torch.relu(m.layers[0](x)).double() for m in models]
    joint = torch.cat(feats, 1)
    expected = torch.cov(joint.T)
    assert torch.allclose(stats.states[group.name].joint_covariance(), expected, atol=1e-10)
    assert stats.states[group.name].num_samples == 111
    capped = fastmerge.collect_stats(models, data, spec, max_batches=2, progress=False)
    assert capped.states[group.name].num_samples == 74
    capped = fastmerge.collect_stats(models, data, spec, max_samples=40, progress=False)
    assert capped.states[group.name].num_samples == 74  # stops after the batch that reached 40


def test_collector_in_a_training_loop_equals_collect_stats():
    torch.manual_seed(0)
    models = [zoo.vgg().eval(), zoo.vgg().eval()]
    spec = trace_spec(models[0], zoo.example_inputs("vgg"))
    data = [torch.randn(8, 1, 8, 8) for _ in range(3)]
    with StatsCollector(models, spec) as collector, torch.no_grad():
        for x in data:
            for m in reversed(models):  # any order
                m(x)
    direct = fastmerge.collect_stats(models, data, spec, progress=False)
    for name, state in collector.stats.states.items():
        assert torch.allclose(state.m2[1], direct.states[name].m2[1], rtol=1e-10)
    # conv features: every position is a sample; max_rows subsamples the same rows in every model
    sub = fastmerge.collect_stats(models, data, spec, max_rows=50, progress=False)
    first = spec.groups[0].name
    assert sub.states[first].num_samples == 150
    assert torch.allclose(sub.correlation(first, 0, 1), direct.correlation(first, 0, 1), atol=0.3)
    with pytest.raises(InvalidArgumentError, match="ran twice"):
        with StatsCollector(models, spec), torch.no_grad():
            models[0](data[0])
            models[0](data[0])


def test_stats_name_the_group_on_non_finite_activations():
    torch.manual_seed(0)
    models = [zoo.mlp().eval(), zoo.mlp().eval()]
    spec = trace_spec(models[0], zoo.example_inputs("mlp"))
    with torch.no_grad():
        models[1].layers[0].weight[3, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="group 'layers.0'"):
        fastmerge.collect_stats(models, [torch.randn(4, 64)], spec, progress=False)
    with pytest.raises(InvalidArgumentError, match="empty"):
        fastmerge.collect_stats(models, [], spec, progress=False)


def test_tap_features_layouts():
    from fastmerge.spec import TapPoint

    x = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    assert torch.equal(tap_features(x, TapPoint("m", dim=1), 3), x.movedim(1, -1).reshape(-1, 3))
    grid = TapPoint("m", dim=-1, factors=(2, 2), unit=0)  # units in blocks of 2: block elements are samples
    feats = tap_features(x, grid, 2)
    assert feats.shape == (12, 2) and torch.equal(feats[0], torch.tensor([0.0, 2.0]))


def test_merge_leaves_inputs_untouched_and_average_is_the_mean():
    torch.manual_seed(0)
    models = [zoo.mlp().eval() for _ in range(3)]
    before = [copy.deepcopy(m.state_dict()) for m in models]
    merged = fastmerge.merge(models, "average")
    for m, b in zip(models, before):
        assert all(torch.equal(m.state_dict()[k], v) for k, v in b.items())
    for k, v in merged.state_dict().items():
        assert torch.allclose(v, sum(b[k] for b in before) / 3, atol=1e-6)
    weighted = fastmerge.merge(models[:2], "average", weights=[0.25, 0.75])
    k = "layers.0.weight"
    assert torch.allclose(weighted.state_dict()[k], 0.25 * before[0][k] + 0.75 * before[1][k], atol=1e-6)


def test_merge_errors():
    torch.manual_seed(0)
    a, b = zoo.mlp(), zoo.mlp(hidden=(32, 16))
    with pytest.raises(ShapeMismatchError, match=r"model 1 does not have model 0's architecture: 3 tensors differ, e.g. layers.2.bias"):
        fastmerge.merge([a, b])
    with pytest.raises(InvalidArgumentError, match="unknown merge method"):
        fastmerge.merge([a, a], "nope")
    with pytest.raises(InvalidArgumentError, match="at least two"):
        fastmerge.merge([a])
    with pytest.raises(InvalidArgumentError, match="needs activation statistics: pass data= or stats="):
        fastmerge.merge([a, a], "permute", example_inputs=zoo.example_inputs("mlp"))
    with pytest.raises(InvalidArgumentError, match="repair_mode='reset' needs BatchNorm"):
        fastmerge.merge([a, a], "average", data=[torch.randn(4, 64)], repair_mode="reset")


def test_batch_norm_reset_recomputes_statistics():
    torch.manual_seed(0)
    model = zoo.resnet20().eval()
    data = [torch.randn(16, 1, 8, 8) for _ in range(3)]
    bn = model.bn1
    with torch.no_grad():
        bn.running_mean.fill_(5.0)
        bn.running_var.fill_(9.0)
        reset_batch_norm(model, data)
        pre = torch.cat([model.conv1(x) for x in data])
    assert not model.training
    assert torch.allclose(bn.running_mean, pre.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, pre.var((0, 2, 3)), rtol=1e-3)
    # merge() does it automatically for BatchNorm models
    other = zoo.resnet20().eval()
    merged = fastmerge.merge([model, other], "permute", data=data, progress=False)
    with torch.no_grad():
        pre = torch.cat([merged.conv1(x) for x in data])
    assert torch.allclose(merged.bn1.running_mean, pre.mean((0, 2, 3)), atol=1e-5)


def test_repair_matches_the_parents_statistics():
    from fastmerge.eval.metrics import accuracy
    from fastmerge.datasets import batches, load_dataset
    from fastmerge.zoo.training import TrainConfig, train

    split = load_dataset("digits")
    config = TrainConfig(epochs=15)
    models = [train(config, split, s) for s in (0, 1)]
    data = batches(split.x_fit)
    merged, alignment = fastmerge.merge(models, "permute", data=data, repair_mode="repair", progress=False,
                                        return_alignment=True)
    # first hidden layer: the merged pre-activations have the averaged mean/std of the aligned parents
    aligned = []
    for i, m in enumerate(models):
        p = copy.deepcopy(m)
        p.load_state_dict(alignment.apply(i, m.state_dict()))
        aligned.append(p)
    with torch.no_grad():
        z = [p.layers[0](split.x_fit).double() for p in aligned]
        target_mean = sum(zz.mean(0) for zz in z) / 2
        target_std = sum(zz.std(0, unbiased=False) for zz in z) / 2
        got = merged.layers[0](split.x_fit).double()
    assert torch.allclose(got.mean(0), target_mean, atol=1e-4)
    assert torch.allclose(got.std(0, unbiased=False), target_std, rtol=1e-3, atol=1e-5)
    plain = fastmerge.merge(models, "average", data=data, repair_mode="none")
    repaired = fastmerge.merge(models, "average", data=data, repair_mode="repair")
    assert accuracy(repaired, split.x_val, split.y_val) > accuracy(plain, split.x_val, split.y_val)


def test_cca_with_dead_units_is_stable_under_rounding_level_changes():
    """Dead units (zero variance; different ones in the two models) leave CCA's polar factor free on
    the null spaces; the transform must still be a continuous function of the statistics: changes at
    the level of summation-order rounding must not move it (they moved it by more than its largest
    entry before the null-space part was fixed)."""
    from fastmerge.alignment.activation import cca_transform

    gen = torch.Generator().manual_seed(0)
    n, c = 400, 12
    x = torch.randn(n, c, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(c, c, generator=gen, dtype=torch.float64) + 0.3 * torch.randn(n, c, generator=gen, dtype=torch.float64)
    x[:, [2, 7]] = 0.0  # dead in model x
    y[:, [4, 5, 9]] = 0.0  # other dead units in model y
    joint = torch.cov(torch.cat([x, y], 1).T)
    s_xx, s_yy, s_xy = joint[:c, :c], joint[c:, c:], joint[:c, c:]
    t, t_inv, r = cca_transform(s_xx, s_yy, s_xy)
    assert float(r[-1]) < 1e-9 * float(r[0])  # rank-deficient: the case under test
    noise = 1e-13 * torch.randn(2 * c, 2 * c, generator=gen, dtype=torch.float64)
    noise = (noise + noise.T) / 2
    live = torch.cat([(x.std(0) > 0), (y.std(0) > 0)])
    noise = noise * live[:, None] * live[None, :]  # rounding only touches the live units
    jittered = joint + noise
    t2, t2_inv, _ = cca_transform(jittered[:c, :c], jittered[c:, c:], jittered[:c, c:])
    assert float((t - t2).abs().max()) < 1e-6 * float(t.abs().max())
    assert torch.allclose(t @ t_inv, torch.eye(c, dtype=torch.float64), atol=1e-10)
