"""mergekit's `model+lora` references: a PEFT LoRA adapter merged into its model as each tensor is
read, checked against PEFT's own merge_and_unload and against mergekit 0.1.5 on the same config.
Skipped where peft (or mergekit) is not installed (both are in the test extra)."""

from __future__ import annotations

import os

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft", reason="peft is not installed (pip install -e '.[test]')")

from fastmerge.cli import main  # noqa: E402
from fastmerge.io import Checkpoint  # noqa: E402


def _llama(seed: int):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=80, tie_word_embeddings=False)
    return transformers.AutoModelForCausalLM.from_config(config)


def _adapter(model, folder, seed: int, **options):
    """A PEFT LoRA adapter with non-zero B (a trained one; PEFT initialises B to zero)."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, **options)
    wrapped = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(0.1 * torch.randn_like(p))
    wrapped.save_pretrained(folder)
    return wrapped


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    for i, name in enumerate("ab"):
        _llama(i).save_pretrained(root / name)
    return root


@pytest.mark.parametrize("options", [
    dict(target_modules=["q_proj", "v_proj", "down_proj"]),
    dict(target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"], use_rslora=True),
], ids=["linear", "embedding-rslora-modules_to_save"])
def test_the_adapter_is_merged_as_peft_merges_it(family, tmp_path, options):
    model = transformers.AutoModelForCausalLM.from_pretrained(family / "a")
    wrapped = _adapter(model, tmp_path / "adapter", seed=1, **options)
    want = {k: v.detach().clone() for k, v in wrapped.merge_and_unload().state_dict().items()}
    ckpt = Checkpoint(f"{family / 'a'}+{tmp_path / 'adapter'}")
    plain = Checkpoint(str(family / "a"))
    changed = 0
    for name in ckpt.keys():
        got = ckpt.read(name)
        assert torch.allclose(got, want[name], rtol=0, atol=2 * torch.finfo(torch.float32).eps * float(want[name].abs().max()))
        changed += not torch.equal(got, plain.read(name))
    assert changed == (6 if "down_proj" in options["target_modules"] else 4)
    assert os.path.abspath(tmp_path / "adapter" / "adapter_model.safetensors") in ckpt.files()


def test_a_merge_config_with_a_lora_reference_matches_mergekit(family, tmp_path):
    pytest.importorskip("mergekit", reason="mergekit is not installed")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    model = transformers.AutoModelForCausalLM.from_pretrained(family / "a")
    _adapter(model, tmp_path / "adapter", seed=2, target_modules=["q_proj", "o_proj", "up_proj"])
    text = (f"merge_method: linear\nmodels:\n  - model: {family / 'a'}+{tmp_path / 'adapter'}\n"
            f"    parameters: {{weight: 0.6}}\n  - model: {family / 'b'}\n    parameters: {{weight: 0.4}}\n"
            "dtype: float32\n")
    (tmp_path / "merge.yml").write_text(text)
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(tmp_path / "mergekit"),
              options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True,
                                   lora_merge_cache=str(tmp_path / "cache")))
    assert main(["merge", "--config", str(tmp_path / "merge.yml"), "-o", str(tmp_path / "fastmerge"), "--quiet"]) == 0
    theirs, ours = Checkpoint(str(tmp_path / "mergekit")), Checkpoint(str(tmp_path / "fastmerge"))
    assert sorted(theirs.keys()) == sorted(ours.keys())
    for name in theirs.keys():
        a, b = theirs.read(name), ours.read(name)
        assert (a - b).abs().max() <= 4 * torch.finfo(torch.float32).eps * float(a.abs().max()), name
    assert os.path.isfile(tmp_path / "fastmerge" / "config.json")  # the model's config


@pytest.mark.parametrize("options, message", [
    (dict(target_modules=["q_proj"], use_dora=True), "DoRA"),
    (dict(target_modules=["q_proj"], rank_pattern={"q_proj": 2}), "rank_pattern"),
    (dict(target_modules=["q_proj"], bias="lora_only"), "trained biases"),
])
def test_unsupported_adapters_are_one_line(family, tmp_path, capsys, options, message):
    model = transformers.AutoModelForCausalLM.from_pretrained(family / "a")
    _adapter(model, tmp_path / "adapter", seed=3, **options)
    capsys.readouterr()  # transformers' loading bars
    code = main(["merge", f"{family / 'a'}+{tmp_path / 'adapter'}", str(family / "b"), "-o", str(tmp_path / "out"),
                 "--quiet"])
    assert code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not os.path.exists(tmp_path / "out")


def test_an_adapter_of_another_model_is_refused(family, tmp_path, capsys):
    other = transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4,
                                                                                  vocab_size=80))
    _adapter(other, tmp_path / "adapter", seed=4, target_modules=["c_attn"])
    code = main(["merge", f"{family / 'a'}+{tmp_path / 'adapter'}", str(family / "b"), "-o", str(tmp_path / "out"),
                 "--quiet"])
    assert code != 0
    assert "which the model does not have" in capsys.readouterr().err
