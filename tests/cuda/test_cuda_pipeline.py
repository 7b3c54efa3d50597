"""The whole pipeline on CUDA tensors: statistics, every alignment, merging and NP Merge, on real
digits MLPs, giving merged models that predict like the CPU's."""

import copy

import pytest

from fastmerge import merge
from fastmerge.zoo.training import TrainConfig, train
from fastmerge.eval.metrics import accuracy
from fastmerge.datasets import batches, load_dataset
from tests.cuda.test_cuda_ops import _cuda_ops_available

pytestmark = pytest.mark.skipif(not _cuda_ops_available(), reason="needs a GPU and the library built with CUDA")


@pytest.fixture(scope="module")
def digits_models():
    split = load_dataset("digits")
    config = TrainConfig(hidden=64, epochs=25)
    return split, [train(config, split, seed) for seed in (0, 1)]


@pytest.mark.parametrize("method", ["permute", "weight_matching", "cca", "zipit", "np_merge"])
def test_merge_on_cuda_matches_cpu(digits_models, method):
    split, models = digits_models
    options = {"np_options": {"steps": 60, "lr": 3e-2, "seed": 0}} if method == "np_merge" else {}
    if method == "np_merge":
        options["val_data"] = list(zip(batches(split.x_val), batches(split.y_val)))
        data = list(zip(batches(split.x_fit), batches(split.y_fit)))
    else:
        data = batches(split.x_fit)
    on_cpu = merge(models, method, data=data, progress=False, **options)

    gpu_models = [copy.deepcopy(m).cuda() for m in models]
    move = (lambda b: tuple(t.cuda() for t in b)) if method == "np_merge" else (lambda b: b.cuda())
    gpu_options = dict(options)
    if method == "np_merge":
        gpu_options["val_data"] = [move(b) for b in options["val_data"]]
    on_gpu = merge(gpu_models, method, data=[move(b) for b in data], progress=False, **gpu_options)

    assert all(p.device.type == "cuda" for p in on_gpu.parameters())
    x, y = split.x_test, split.y_test
    acc_cpu, acc_gpu = accuracy(on_cpu, x, y), accuracy(on_gpu.cpu(), x, y)
    assert abs(acc_cpu - acc_gpu) <= 1.0, (acc_cpu, acc_gpu)
    parents = sum(accuracy(m, x, y) for m in models) / 2
    assert acc_gpu > parents - 6.0, (acc_gpu, parents)
    # Not the same weights: statistics from GPU and CPU forward passes differ in the last bits, which
    # can flip a near-tied unit match (seen on an H100 for permute and CCA). The same function:
    agree = (on_cpu(x).argmax(1) == on_gpu.cpu()(x).argmax(1)).double().mean().item()
    assert agree >= 0.95, agree
