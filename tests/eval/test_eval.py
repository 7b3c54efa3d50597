"""fastmerge.eval on real digits models: barriers (0 for a model with itself; invariant to a
function-preserving permutation of one endpoint once aligned), the loss plane's geometry, ensembles,
feature pictures, and the PNG figures."""

import copy
import struct

import pytest
import torch

import fastmerge
from fastmerge import zoo
from fastmerge.zoo.training import TrainConfig, train
from fastmerge.datasets import load_dataset
from fastmerge.eval import ensemble, evaluate, feature_pictures, interpolate, loss_plane
from fastmerge.eval import plots
from fastmerge.merging.repair import reset_batch_norm
from fastmerge.spec.transforms import apply_permutations


@pytest.fixture(scope="module")
def split():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def parents(split):
    return [train(TrainConfig(hidden=32, epochs=10), split, seed=s) for s in range(3)]


def labelled(split, part="test", size=128):
    x, y = (split.x_test, split.y_test) if part == "test" else (split.x_fit, split.y_fit)
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def test_metrics_match_a_direct_computation_and_an_ensemble_of_one_model_is_the_model(split, parents):
    m = evaluate(parents[0], labelled(split))
    logits = parents[0](split.x_test)
    assert m.samples == len(split.y_test)
    assert m.accuracy == pytest.approx(100 * float((logits.argmax(1) == split.y_test).double().mean()))
    assert m.loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, split.y_test)), rel=1e-5)
    same = ensemble([parents[0], copy.deepcopy(parents[0])], labelled(split))
    assert same.accuracy == m.accuracy and same.loss == pytest.approx(m.loss, rel=1e-5)


def test_barrier_of_a_model_with_itself_is_zero(split, parents):
    curve = interpolate(parents[0], copy.deepcopy(parents[0]), labelled(split), steps=5)
    assert len(curve.ts) == 5 and curve.ts[0] == 0 and curve.ts[-1] == 1
    assert abs(curve.loss_barrier()) < 1e-9 and abs(curve.accuracy_barrier()) < 1e-9


def test_barrier_after_alignment_is_invariant_to_permuting_one_endpoint(split, parents):
    a, b = parents[0], parents[1]
    spec = fastmerge.trace_spec(a, (split.x_test[:2],))
    gen = torch.Generator().manual_seed(3)
    perms = {g.name: torch.stack([torch.randperm(g.size, generator=gen) for _ in range(g.count)]) for g in spec.groups}
    shuffled = copy.deepcopy(b)
    shuffled.load_state_dict(apply_permutations(spec, b.state_dict(), perms))
    assert torch.allclose(shuffled(split.x_test), b(split.x_test), atol=1e-5)  # the same function
    fit = [x for x, _ in labelled(split, "fit")]
    curves = []
    for endpoint in (b, shuffled):
        alignment = fastmerge.align([a, endpoint], "permute", spec=spec, data=fit, progress=False)
        aligned = copy.deepcopy(endpoint)
        aligned.load_state_dict(alignment.apply(1, endpoint.state_dict()))
        curves.append(interpolate(a, aligned, labelled(split), steps=6))
    assert curves[0].loss_barrier() == pytest.approx(curves[1].loss_barrier(), abs=1e-5)
    assert curves[0].accuracy == pytest.approx(curves[1].accuracy, abs=1e-9)
    direct = interpolate(a, b, labelled(split), steps=6)
    assert direct.loss_barrier() > curves[0].loss_barrier() + 0.1  # alignment lowers the barrier


def test_batchnorm_is_reset_at_every_point(split):
    torch.manual_seed(0)
    models = [zoo.resnet20(in_channels=1, width=1).eval() for _ in range(2)]
    data = [(x.view(-1, 1, 8, 8), y) for x, y in labelled(split)][:3]
    curve = interpolate(models[0], models[1], data, ts=[0.0, 1.0])
    reset = reset_batch_norm(copy.deepcopy(models[1]), [x for x, _ in data])
    assert curve.loss[-1] == pytest.approx(evaluate(reset, data).loss, rel=1e-5)
    assert curve.loss[-1] != pytest.approx(evaluate(models[1], data).loss, rel=1e-3)  # stale statistics differ


def test_loss_plane_geometry_and_corners(split, parents):
    a, b = parents[0], parents[1]
    middle = copy.deepcopy(a)
    gen = torch.Generator().manual_seed(0)
    middle.load_state_dict({k: (va + b.state_dict()[k]) / 2 + 0.05 * torch.randn(va.shape, generator=gen)
                            for k, va in a.state_dict().items()})
    plane = loss_plane([a, b, middle], labelled(split), grid=5, margin=0.0)
    flat = [torch.cat([p.detach().double().reshape(-1) for p in m.state_dict().values()]) for m in (a, b, middle)]
    assert plane.points[1][0] == pytest.approx(float((flat[1] - flat[0]).norm()))
    assert (plane.points[2][0] ** 2 + plane.points[2][1] ** 2) ** 0.5 == pytest.approx(float((flat[2] - flat[0]).norm()))
    assert plane.u[0] == 0 and plane.v[0] == 0  # model 0 at a corner, model 1 at the next
    assert plane.loss[0][0] == pytest.approx(evaluate(a, labelled(split)).loss, rel=1e-5)
    assert plane.loss[0][-1] == pytest.approx(evaluate(b, labelled(split)).loss, rel=1e-4)


def _png_size(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


def test_figures_are_valid_pngs_of_sensible_size(tmp_path, split, parents):
    spec = fastmerge.trace_spec(parents[0], (split.x_test[:2],))
    fit = [x for x, _ in labelled(split, "fit")]
    alignments = {m: fastmerge.align(parents[:2], m, spec=spec, data=fit, progress=False) for m in ("permute", "cca")}
    curves = {"direct": interpolate(parents[0], parents[1], labelled(split), steps=3)}
    train_batches = labelled(split, "fit", 64)
    result = fastmerge.np_merge(parents[:2], train_batches, steps=5, progress=False)
    plane = loss_plane(parents, labelled(split), grid=4)
    written = [plots.plot_interpolation(curves, tmp_path / "curves.png"),
               plots.plot_alignment(alignments, tmp_path / "alignment.png"),
               plots.plot_np_coefficients(result.coefficients, tmp_path / "np.png"),
               plots.plot_loss_plane(plane, tmp_path / "plane.png")]
    for path in written:
        width, height = _png_size(path)
        assert 300 <= width <= 4000 and 200 <= height <= 4000, (path, width, height)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alignment.png", "curves.png", "np.png", "plane.png"]


def test_feature_pictures_rank_real_inputs_and_synthesise_stronger_ones(tmp_path, split):
    torch.manual_seed(0)
    cnn = zoo.vgg(in_channels=1, image_size=8, widths=(8, 16), fc_hidden=32)
    images = split.x_test.view(-1, 1, 8, 8)
    layer = "features.0"
    pictures = feature_pictures({"A": cnn, "A copy": copy.deepcopy(cnn)}, layer, images, num_units=3, top_k=3,
                                steps=200)
    assert pictures.correlations == pytest.approx([1.0] * 3, abs=1e-5)  # a model matches itself exactly
    conv = dict(cnn.named_modules())[layer]
    for row, unit in enumerate(pictures.unit_index):
        responses = conv(images).mean((2, 3))[:, unit]
        top = conv(pictures.top["A"][row]).mean((2, 3))[:, unit]
        assert torch.allclose(top, responses.sort(descending=True).values[:3], atol=1e-5)
        # activation maximisation targets the centre of the feature map: stronger than real digits there
        synthetic = conv(pictures.maximising["A"][row][None])[0, unit, 4, 4]
        assert synthetic > conv(images)[:, unit, 4, 4].quantile(0.95)
    width, height = _png_size(plots.plot_feature_grid(pictures, tmp_path / "features.png"))
    assert width > 300 and height > 150
    with pytest.raises(fastmerge.errors.InvalidArgumentError, match="not a submodule"):
        feature_pictures({"A": cnn}, "nope", images)
