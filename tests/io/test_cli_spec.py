"""`fastmerge spec`: YAML specs from a model factory or from a Hugging Face config.json, usable by
`fastmerge merge --align weight_matching --spec`."""

import json

import torch
from safetensors.torch import load_file, save_file

from fastmerge import zoo
from fastmerge.cli import main
from fastmerge.spec import load_spec, spec_to_yaml, trace_spec
from fastmerge.spec.transforms import apply_permutations

KWARGS = {"in_features": 12, "hidden": [16, 16], "out_features": 4}


def test_spec_from_a_model_factory_equals_the_trace_and_drives_a_file_merge(tmp_path, capsys):
    out = tmp_path / "mlp.spec.yaml"
    assert main(["spec", "--model", "fastmerge.zoo:mlp", "--model-kwargs", json.dumps(KWARGS),
                 "--input-shape", "2,12", "--check", "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    model = zoo.mlp(in_features=12, hidden=(16, 16), out_features=4)
    expected = trace_spec(model, (torch.zeros(2, 12),))
    assert spec_to_yaml(load_spec(out, model)) == spec_to_yaml(expected)
    # a permuted copy of a checkpoint is recovered by weight matching with that spec, from the files
    state = model.state_dict()
    gen = torch.Generator().manual_seed(1)
    perms = {g.name: torch.stack([torch.randperm(g.size, generator=gen)]) for g in expected.groups}
    save_file(state, str(tmp_path / "a.safetensors"))
    save_file(apply_permutations(expected, state, perms), str(tmp_path / "b.safetensors"))
    merged = tmp_path / "merged.safetensors"
    assert main(["merge", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--align",
                 "weight_matching", "--spec", str(out), "-o", str(merged), "--quiet"]) == 0
    for k, v in load_file(str(merged)).items():
        assert torch.allclose(v, state[k], atol=1e-6), k  # the average of a model and its aligned copy


def test_spec_from_a_hugging_face_config(tmp_path):
    import transformers

    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gpt2", safe_serialization=True)
    out = tmp_path / "gpt2.spec.yaml"
    assert main(["spec", str(tmp_path / "gpt2"), "-o", str(out), "--quiet"]) == 0
    spec = load_spec(out)
    assert any("attn" in g.name or "head" in g.name for g in spec.groups) and len(spec.groups) >= 3
    assert main(["spec", str(tmp_path / "gpt2"), "-o", str(out), "--quiet"]) == 2  # exists: needs --overwrite


def test_mistakes_exit_2(tmp_path, capsys):
    out = str(tmp_path / "s.yaml")
    for args in (["--model", "fastmerge.zoo:mlp", "-o", out],  # no --input-shape
                 ["--model", "fastmerge.zoo:mlp", "--input-shape", "2,x", "-o", out],
                 ["--model", "fastmerge.zoo:mlp", "--input-shape", "99999999,99999999", "-o", out],  # no 40 PB input
                 ["-o", out],  # neither checkpoint nor model
                 [str(tmp_path), "-o", out]):  # no config.json
        assert main(["spec", *args]) == 2
        assert capsys.readouterr().err.startswith("fastmerge spec: ")
