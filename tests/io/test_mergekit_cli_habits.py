"""mergekit-yaml's command-line habits work on `fastmerge merge`: the positional output, its flags
(--out-shard-size in mergekit's units, --no-copy-tokenizer, --no-write-model-card, --random-seed,
and the accepted no-ops)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from fastmerge.cli import main
from fastmerge.io import Checkpoint


@pytest.fixture
def config(tmp_path):
    for k, name in enumerate("ab"):
        folder = tmp_path / name
        folder.mkdir()
        torch.manual_seed(k)
        save_file({f"w{i}": torch.randn(64, 64) for i in range(4)}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (folder / "tokenizer.json").write_text("{}")
    path = tmp_path / "merge.yml"
    path.write_text(f"merge_method: linear\nmodels:\n  - model: {tmp_path / 'a'}\n    parameters: {{weight: 1}}\n"
                    f"  - model: {tmp_path / 'b'}\n    parameters: {{weight: 3}}\n")
    return path


def test_config_and_output_as_mergekit_yaml_takes_them(config, tmp_path):
    out = tmp_path / "merged"
    assert main(["merge", str(config), str(out), "--quiet", "--cuda", "--allow-crimes", "--lazy-unpickle"]) == 0
    merged, a, b = (Checkpoint(str(p)) for p in (out, tmp_path / "a", tmp_path / "b"))
    torch.testing.assert_close(merged["w0"], 0.25 * a["w0"] + 0.75 * b["w0"])
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "tokenizer.json"]
    again = tmp_path / "again"
    assert main(["merge", "--config", str(config), str(again), "--quiet", "--no-copy-tokenizer",
                 "--no-write-model-card"]) == 0
    assert sorted(p.name for p in again.iterdir()) == ["config.json", "model.safetensors"]


def test_out_shard_size_counts_as_mergekit_does(config, tmp_path):
    out = tmp_path / "sharded"
    # 4 tensors of 16 KiB: 20K (20,000 bytes, mergekit's K) holds one each
    assert main(["merge", str(config), str(out), "--quiet", "--out-shard-size", "20K"]) == 0
    assert len(list(out.glob("model-*-of-00004.safetensors"))) == 4


@pytest.mark.parametrize("args, message", [
    (["--out-shard-size", "5X"], "K, M or B"),
    (["extra-model"], "give the output as one argument"),
])
def test_mistakes_are_one_line(config, tmp_path, capsys, args, message):
    assert main(["merge", "--config", str(config), str(tmp_path / "o"), *args, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_allow_unknown_ignores_keys_no_method_reads_with_a_warning(config, tmp_path, capsys):
    text = config.read_text().replace("{weight: 3}", "{weight: 3, density: 0.5}") + "name: my-merge\n"
    config.write_text(text)
    assert main(["merge", str(config), str(tmp_path / "refused"), "--quiet"]) == 2
    assert "allow-unknown" in capsys.readouterr().err
    out = tmp_path / "merged"
    assert main(["merge", str(config), str(out), "--quiet", "--allow-unknown"]) == 0
    err = capsys.readouterr().err
    assert "ignoring" in err and "density" in err and "name" in err
    merged, a, b = (Checkpoint(str(p)) for p in (out, tmp_path / "a", tmp_path / "b"))
    torch.testing.assert_close(merged["w0"], 0.25 * a["w0"] + 0.75 * b["w0"])
