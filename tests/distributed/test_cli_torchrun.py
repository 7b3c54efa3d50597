"""`fastmerge merge --model ... --data ...` launched by torchrun (2 real gloo processes): every rank
passes its shard of the data, rank 0 writes one output, equal to one process's on all the data."""

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastmerge.zoo.training import TrainConfig, train
from fastmerge.eval.metrics import accuracy
from fastmerge.datasets import load_dataset
from fastmerge.zoo import mlp

KWARGS = {"in_features": 64, "hidden": [32, 32], "out_features": 10}
MODEL = ["--model", "fastmerge.zoo:mlp", "--model-kwargs", json.dumps(KWARGS)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    split = load_dataset("digits")
    paths = []
    for seed in range(2):  # real models from different initialisations (a short training run)
        path = folder / f"model{seed}.safetensors"
        save_file(train(TrainConfig(hidden=32, epochs=8), split, seed=seed).state_dict(), str(path))
        paths.append(str(path))
    return paths


def fastmerge_cli(args, nproc=None):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
                "fastmerge"] if nproc else [sys.executable, "-m", "fastmerge"]
    done = subprocess.run(launcher + ["merge", *args, "--quiet"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def loaded(path):
    model = mlp(in_features=64, hidden=(32, 32), out_features=10)
    model.load_state_dict(load_file(path))
    return model.eval()


def test_torchrun_merge_equals_one_process(checkpoints, tmp_path):
    before = [digest(p) for p in checkpoints]
    fastmerge_cli([*checkpoints, "--align", "cca", *MODEL, "--data", "digits", "--repair", "repair",
                   "-o", str(tmp_path / "two.safetensors")], nproc=2)
    fastmerge_cli([*checkpoints, "--align", "cca", *MODEL, "--data", "digits", "--repair", "repair",
                   "-o", str(tmp_path / "one.safetensors")])
    two, one = load_file(tmp_path / "two.safetensors"), load_file(tmp_path / "one.safetensors")
    assert set(two) == set(one) == set(load_file(checkpoints[0]))
    for name in one:
        assert torch.allclose(two[name], one[name], rtol=1e-5, atol=1e-6), name
    assert [digest(p) for p in checkpoints] == before  # inputs untouched
    split = load_dataset("digits")
    # a real merge of models from different initialisations: far above chance and above plain averaging
    direct = mlp(in_features=64, hidden=(32, 32), out_features=10)
    direct.load_state_dict({k: (v + load_file(checkpoints[1])[k]) / 2 for k, v in load_file(checkpoints[0]).items()})
    merged_acc = accuracy(loaded(str(tmp_path / "two.safetensors")), split.x_val, split.y_val)
    assert merged_acc > accuracy(direct.eval(), split.x_val, split.y_val) + 5 and merged_acc > 80


def test_torchrun_np_merge_learns_coefficients(checkpoints, tmp_path):
    common = [*checkpoints, "--align", "permute", *MODEL, "--data", "digits"]
    fastmerge_cli([*common, "-o", str(tmp_path / "avg.safetensors")])
    fastmerge_cli([*common, "--method", "np_merge", "--np-steps", "40", "--np-lr", "0.03", "--val-data", "digits:val",
                   "-o", str(tmp_path / "np.safetensors")], nproc=2)
    avg, learned = load_file(tmp_path / "avg.safetensors"), load_file(tmp_path / "np.safetensors")
    assert any(not torch.allclose(avg[k], learned[k]) for k in avg), "NP Merge moved the coefficients"
    split = load_dataset("digits")
    # the step count is chosen on validation accuracy, starting from the uniform merge (step 0)
    assert (accuracy(loaded(str(tmp_path / "np.safetensors")), split.x_val, split.y_val)
            >= accuracy(loaded(str(tmp_path / "avg.safetensors")), split.x_val, split.y_val))
