"""`fastmerge merge --model ... --data ...` in one process: the architecture from Python, the
weights from files, the alignment on data; the same model as the Python API, and one-line errors
(exit 2, nothing written) for what a user gets wrong."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastmerge
from fastmerge.cli import main
from fastmerge.datasets import load_dataset

BUILD = """
from fastmerge.zoo import mlp


def build():
    return mlp(in_features=64, hidden=(24, 24), out_features=10)
"""


@pytest.fixture
def files(tmp_path):
    (tmp_path / "arch.py").write_text(BUILD)
    paths = []
    for seed in range(2):
        torch.manual_seed(seed)
        model = fastmerge.zoo.mlp(in_features=64, hidden=(24, 24), out_features=10)
        paths.append(str(tmp_path / f"m{seed}.safetensors"))
        save_file(model.state_dict(), paths[-1])
    return tmp_path, paths


def _models_and_batches(paths, batch_size):
    """The files' models as the Python API takes them, and the digits batches `--data digits` gives."""
    models = []
    for p in paths:
        m = fastmerge.zoo.mlp(in_features=64, hidden=(24, 24), out_features=10)
        m.load_state_dict(load_file(p))
        models.append(m.eval())
    x, y = load_dataset("digits").x_fit, load_dataset("digits").y_fit
    return models, [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


def test_model_from_a_file_gives_the_python_api_merge(files):
    tmp_path, paths = files
    out = tmp_path / "merged.safetensors"
    assert main(["merge", *paths, "--align", "permute", "--model", f"{tmp_path}/arch.py:build", "--data", "digits",
                 "--batch-size", "128", "--repair", "repair", "-o", str(out), "--quiet"]) == 0
    models, batches = _models_and_batches(paths, 128)
    expected = fastmerge.merge(models, "permute", data=batches, repair_mode="repair", progress=False).state_dict()
    written = load_file(out)
    assert set(written) == set(expected)
    for k, v in expected.items():
        assert torch.equal(written[k], v), k


def test_np_merge_distilling_the_ensemble_gives_the_python_api_merge(files):
    tmp_path, paths = files
    out = tmp_path / "merged.safetensors"
    assert main(["merge", *paths, "--align", "permute", "--method", "np_merge", "--model", f"{tmp_path}/arch.py:build",
                 "--data", "digits", "--batch-size", "256", "--np-steps", "8", "--np-lr", "0.03", "--np-distill", "0.5",
                 "-o", str(out), "--quiet"]) == 0
    models, batches = _models_and_batches(paths, 256)
    options = {"steps": 8, "lr": 0.03}
    expected = fastmerge.merge(models, "np_merge", data=batches, np_options={**options, "distill": 0.5},
                               progress=False).state_dict()
    labels_only = fastmerge.merge(models, "np_merge", data=batches, np_options=options, progress=False).state_dict()
    written = load_file(out)
    for k, v in expected.items():
        assert torch.equal(written[k], v), k
    assert any(not torch.equal(written[k], v) for k, v in labels_only.items())  # the option reached NP Merge


ERRORS = [
    (["--align", "cca", "--data", "digits"], "--model"),
    (["--align", "cca", "--model", "fastmerge.zoo:mlp"], "--data"),
    (["--align", "cca", "--model", "fastmerge.zoo", "--data", "digits"], "module:attribute"),
    (["--align", "cca", "--model", "fastmerge.zoo:no_such", "--data", "digits"], "no attribute"),
    (["--align", "cca", "--model", "no_such_module:x", "--data", "digits"], "cannot import"),
    (["--align", "cca", "--model", "fastmerge.zoo:mlp", "--model-kwargs", "{bad", "--data", "digits"], "JSON"),
    (["--align", "cca", "--model", "fastmerge.zoo:mlp", "--model-kwargs",
      json.dumps({"in_features": 64, "hidden": [16, 16], "out_features": 10}), "--data", "digits"], "shape"),
    (["--align", "cca", "--model", "fastmerge.zoo:mlp", "--model-kwargs",
      json.dumps({"in_features": 64, "hidden": [24], "out_features": 10}), "--data", "digits"], "unexpected 2"),
    (["--align", "cca", "--method", "ties", "--model", "fastmerge.zoo:mlp", "--data", "digits"], "np_merge"),
    (["--align", "cca", "--model", "fastmerge.zoo:mlp", "--data", "no_such_data"], "--data"),
    (["--method", "np_merge"], "--model"),
    (["--align", "permute", "--method", "np_merge", "--model", "fastmerge.zoo:mlp", "--model-kwargs",
      json.dumps({"in_features": 64, "hidden": [24, 24], "out_features": 10}), "--data", "digits",
      "--np-distill", "2"], "between 0 and 1"),
]


@pytest.mark.parametrize("args,words", ERRORS)
def test_mistakes_give_one_line_and_exit_2_and_write_nothing(files, capsys, args, words):
    tmp_path, paths = files
    out = tmp_path / "out.safetensors"
    assert main(["merge", *paths, *args, "-o", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("fastmerge merge: ") and words in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["arch.py", "m0.safetensors",
                                                                               "m1.safetensors"]
