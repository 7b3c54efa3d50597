"""NP Merge: learned per-parameter coefficients on top of any alignment."""

import copy

import pytest
import torch

import fastmerge
import fastmerge.zoo as zoo
from fastmerge.zoo.training import TrainConfig, train
from fastmerge.eval.metrics import accuracy
from fastmerge.datasets import batches, load_dataset
from fastmerge.errors import InvalidArgumentError
from fastmerge import np_merge


@pytest.fixture(scope="module")
def digits():
    split = load_dataset("digits")
    models = [train(TrainConfig(epochs=30), split, s) for s in range(4)]
    data = list(zip(batches(split.x_fit, 64), batches(split.y_fit, 64)))
    val = list(zip(batches(split.x_val), batches(split.y_val)))
    return split, models, data, val


def test_zero_steps_is_uniform_averaging_exactly(digits):
    split, models, data, _ = digits
    result = np_merge(models[:2], data, steps=0, progress=False)
    average = fastmerge.merge(models[:2], "average")
    for key, value in average.state_dict().items():
        assert torch.equal(result.model.state_dict()[key], value), key
    for c in result.coefficients.values():
        assert torch.all(c == 0.5)
    joint = np_merge(models, data, steps=0, progress=False)
    for c in joint.coefficients.values():
        assert torch.allclose(c, torch.full_like(c, 0.25))


def test_np_merge_beats_uniform_after_the_same_alignment(digits):
    split, models, data, val = digits
    gains = []
    for i, j in [(0, 1), (0, 2), (1, 3)]:
        pair = [models[i], models[j]]
        uniform = fastmerge.merge(pair, "permute", data=batches(split.x_fit), repair_mode="none", progress=False)
        learned = fastmerge.merge(pair, "np_merge", align_method="permute", data=data, val_data=val,
                                  np_options={"steps": 200, "lr": 3e-2}, progress=False)
        gains.append(accuracy(learned, split.x_test, split.y_test) - accuracy(uniform, split.x_test, split.y_test))
    print("test accuracy gains of NP Merge over uniform after permute:", gains)
    assert sum(gains) / len(gains) > 1.0


@pytest.mark.parametrize("mode", ["joint", "pairwise"])
def test_four_models_both_forms(digits, mode):
    split, models, data, val = digits
    uniform = fastmerge.merge(models, "permute", data=batches(split.x_fit), repair_mode="none", progress=False)
    aligned = fastmerge.align(models, "permute", spec=fastmerge.trace_spec(models[0], (split.x_fit[:4],)),
                              data=batches(split.x_fit), progress=False)
    parents = []
    for i, m in enumerate(models):
        p = copy.deepcopy(m)
        p.load_state_dict(aligned.apply(i, m.state_dict()))
        parents.append(p)
    result = np_merge(parents, data, val_data=val, steps=150, lr=3e-2, mode=mode, progress=False)
    assert accuracy(result.model, split.x_test, split.y_test) > accuracy(uniform, split.x_test, split.y_test) + 1
    for name, c in result.coefficients.items():
        assert c.shape[0] == 4
        assert torch.all(c > 0) and torch.all(c < 1), name
        assert torch.allclose(c.sum(0), torch.ones_like(c[0]), atol=1e-5), name
    assert "layers.0.weight" in result.summary()


@pytest.mark.parametrize("granularity,shape", [("entry", (32, 64)), ("channel", (32, 1)), ("tensor", (1, 1))])
def test_granularity(digits, granularity, shape):
    _, models, data, _ = digits
    result = np_merge(models[:2], data, steps=5, granularity=granularity, progress=False)
    c = result.coefficients["layers.0.weight"]
    assert c.shape == (2,) + shape
    assert torch.all(c > 0) and torch.all(c < 1)
    assert torch.allclose(c.sum(0), torch.ones(shape))


def test_batch_norm_model_and_errors():
    torch.manual_seed(0)
    models = [zoo.resnet20().eval(), zoo.resnet20().eval()]
    data = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))) for _ in range(2)]
    merged = fastmerge.merge(models, "np_merge", align_method="weight_matching", data=data,
                             example_inputs=(torch.randn(2, 1, 8, 8),), np_options={"steps": 3}, progress=False)
    with torch.no_grad():  # BatchNorm statistics recomputed on the data at the end
        pre = torch.cat([merged.conv1(x) for x, _ in data])
    assert torch.allclose(merged.bn1.running_mean, pre.mean((0, 2, 3)), atol=1e-5)
    with pytest.raises(InvalidArgumentError, match="granularity"):
        np_merge(models, data, granularity="row")
    with pytest.raises(InvalidArgumentError, match="needs data"):
        fastmerge.merge(models, "np_merge")
    with pytest.raises(InvalidArgumentError, match=r"\(inputs, targets\)"):
        np_merge(models, [torch.randn(4, 1, 8, 8)], steps=1, progress=False)


def _kl_to_ensemble(model, teachers, x) -> float:
    """KL(ensemble || model) per sample, in float64 (the reference of the distillation loss)."""
    with torch.no_grad():
        probs = sum(torch.softmax(t(x).double(), -1) for t in teachers) / len(teachers)
        return float((probs * (probs.log() - torch.log_softmax(model(x).double(), -1))).sum(-1).mean())


def test_distillation_loss_is_kl_to_the_ensemble():
    from fastmerge.merging.np_merge import _distillation_loss
    torch.manual_seed(0)
    logits, probs = torch.randn(6, 5, 10), torch.softmax(torch.randn(6, 5, 10), -1)
    expected = (probs.double() * (probs.double().log() - torch.log_softmax(logits.double(), -1))).sum(-1).mean()
    assert abs(float(_distillation_loss(logits, probs)) - float(expected)) < 1e-6
    assert abs(float(_distillation_loss(probs.log(), probs))) < 1e-6  # the ensemble itself: nothing to learn


def test_distilling_the_ensemble_needs_no_labels(digits):
    split, models, data, _ = digits
    unlabelled = [x for x, _ in data]
    pair = models[:2]
    for m in pair:
        m.train()  # the teachers' modes are given back as they came
    try:
        before = [copy.deepcopy(m.state_dict()) for m in pair]
        uniform = np_merge(pair, unlabelled, steps=0, distill=1.0, progress=False).model
        learned = np_merge(pair, unlabelled, steps=100, lr=3e-2, distill=1.0, progress=False).model
        assert all(m.training for m in pair)
        for m, state in zip(pair, before):
            for k, v in m.state_dict().items():
                assert torch.equal(v, state[k]), k
    finally:
        for m in pair:
            m.eval()
    x = split.x_val
    assert _kl_to_ensemble(learned, pair, x) < 0.5 * _kl_to_ensemble(uniform, pair, x)
    with pytest.raises(InvalidArgumentError, match="distill=1"):
        np_merge(pair, unlabelled, steps=1, distill=0.5, progress=False)
    with pytest.raises(InvalidArgumentError, match="between 0 and 1"):
        np_merge(pair, data, steps=1, distill=1.5, progress=False)


def test_teacher_outputs_computed_once_per_batch_of_a_list(digits):
    _, models, data, _ = digits
    pair = models[:2]
    teachers = [copy.deepcopy(m) for m in pair]  # counted apart from the merge's own copies of the parents
    calls = [0]
    for t in teachers:
        t.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    np_merge(pair, data[:4], steps=12, distill=0.5, teachers=teachers, progress=False)  # 3 cycles over 4 batches
    assert calls[0] == 2 * 4  # each teacher once per batch: kept after the first cycle
    calls[0] = 0
    np_merge(pair, iter(data[:4] * 3), steps=12, distill=0.5, teachers=teachers, progress=False)  # not a list
    assert calls[0] == 2 * 12


def test_merge_distills_the_models_as_given(digits):
    """merge(..., "np_merge") distils the original models: after CCA (a dense alignment) the
    aligned parents compute other functions, so their ensemble would be another target."""
    split, models, data, val = digits
    pair = models[:2]
    calls = [0]

    def count(module, *_):  # the originals themselves (the merge's copies of them carry the hook too)
        calls[0] += any(module is m for m in pair)

    handles = [m.register_forward_hook(count) for m in pair]
    try:
        counts = []
        for distill in (0.0, 1.0):
            calls[0] = 0
            fastmerge.merge(pair, "np_merge", align_method="cca", data=data, val_data=val,
                            np_options={"steps": len(data), "distill": distill}, progress=False)
            counts.append(calls[0])
    finally:
        for h in handles:
            h.remove()
    assert counts[1] - counts[0] == 2 * len(data)  # one call of each original per training batch


def test_batch_norm_teachers_run_in_eval_mode_and_are_left_as_they_came():
    torch.manual_seed(0)
    models = [zoo.resnet20(), zoo.resnet20()]  # in train mode: a teacher pass there would move their statistics
    before = [copy.deepcopy(m.state_dict()) for m in models]
    data = [torch.randn(8, 1, 8, 8) for _ in range(2)]
    result = np_merge(models, data, steps=3, distill=1.0, progress=False)
    for m, state in zip(models, before):
        assert m.training and all(sub.training for sub in m.modules())
        for k, v in m.state_dict().items():
            assert torch.equal(v, state[k]), k
    with torch.no_grad():  # the merge's own BatchNorm statistics recomputed on the data at the end
        pre = torch.cat([result.model.conv1(x) for x in data])
    assert torch.allclose(result.model.bn1.running_mean, pre.mean((0, 2, 3)), atol=1e-5)


def test_pairwise_distillation_learns_the_ensemble_of_the_models_so_far(digits):
    split, models, data, _ = digits
    unlabelled = [x for x, _ in data]
    uniform = np_merge(models[:3], unlabelled, steps=0, mode="pairwise", distill=1.0, progress=False)
    result = np_merge(models[:3], unlabelled, steps=60, lr=3e-2, mode="pairwise", distill=1.0, progress=False)
    for c in result.coefficients.values():
        assert c.shape[0] == 3 and torch.allclose(c.sum(0), torch.ones_like(c[0]), atol=1e-5)
    x = split.x_val
    assert _kl_to_ensemble(result.model, models[:3], x) < _kl_to_ensemble(uniform.model, models[:3], x)
    with pytest.raises(InvalidArgumentError, match="a teacher per model"):
        np_merge(models[:3], unlabelled, steps=1, mode="pairwise", distill=1.0, teachers=models[:2], progress=False)
