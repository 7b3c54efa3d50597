"""`fastmerge eval`: the built-in job and checkpoint files give metrics.json, a table and PNGs; a
rerun gives the same numbers."""

import json

from safetensors.torch import save_file

from fastmerge.cli import main
from fastmerge.zoo.training import TrainConfig, train
from fastmerge.datasets import load_dataset

FIGURES = {"interpolation.png", "alignment.png", "np_coefficients.png", "loss_plane.png"}


def test_builtin_quick_job_writes_numbers_and_figures_and_reruns_identically(tmp_path, capsys):
    runs = []
    for k in range(2):
        out = tmp_path / f"run{k}"
        assert main(["eval", "--quick", "--out", str(out)]) == 0
        runs.append(json.loads((out / "metrics.json").read_text()))
        assert FIGURES | {"features.png", "metrics.json"} <= {p.name for p in out.iterdir()}
        for png in out.glob("*.png"):
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    table = capsys.readouterr().out
    assert "| merge: permute |" in table and "| ensemble of 3 |" in table
    m = runs[0]
    direct, permute = m["merges"]["direct (no alignment)"], m["merges"]["permute"]
    assert permute["accuracy"] > direct["accuracy"] + 20  # different initialisations: alignment matters
    assert m["curves"]["direct (no alignment)"]["loss_barrier"] > m["curves"]["permute"]["loss_barrier"] + 0.3
    assert runs[0] == runs[1], "a rerun on the CPU gives the same numbers"


def test_checkpoint_files_with_a_model_factory(tmp_path, capsys):
    split = load_dataset("digits")
    paths = []
    for seed in range(2):
        paths.append(str(tmp_path / f"m{seed}.safetensors"))
        save_file(train(TrainConfig(hidden=32, epochs=8), split, seed=seed).state_dict(), paths[-1])
    out = tmp_path / "eval"
    assert main(["eval", *paths, "--model", "fastmerge.zoo:mlp", "--model-kwargs",
                 json.dumps({"in_features": 64, "hidden": [32, 32], "out_features": 10}), "--data", "digits",
                 "--methods", "permute,cca", "--quick", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["merges"]) == {"direct (no alignment)", "permute", "cca", "NP Merge after permute"}
    assert len(metrics["parents"]) == 2 and "plane" not in metrics  # a plane needs three models
    assert FIGURES - {"loss_plane.png"} <= {p.name for p in out.iterdir()}
    assert main(["eval", paths[0], "--model", "fastmerge.zoo:mlp", "--data", "digits", "--out", str(out)]) == 2
    assert "2 or 3 checkpoints" in capsys.readouterr().err
