"""A merged folder is a Hugging Face model: from_pretrained loads it (config copied, dtype updated),
with the generation config, a model card, and nothing overwritten without overwrite=True."""

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fastmerge.errors import CheckpointError  # noqa: E402
from fastmerge.merging.checkpoints import merge_checkpoints  # noqa: E402
from fastmerge.merging.same_init import SameInitOptions  # noqa: E402


def _tiny_llama(folder, seed):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(config)
    model.generation_config.max_new_tokens = 7
    model.save_pretrained(folder, safe_serialization=True)
    return model


def test_a_merged_folder_loads_with_from_pretrained(tmp_path):
    a, b = _tiny_llama(tmp_path / "a", 0), _tiny_llama(tmp_path / "b", 1)
    out = tmp_path / "merged"
    merge_checkpoints([str(tmp_path / "a"), str(tmp_path / "b")], str(out), SameInitOptions("linear"),
                      dtype="bfloat16", progress=False)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == 7
    card = (out / "README.md").read_text()
    assert "linear" in card and "- a" in card and "- b" in card
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    expected = {k: ((v + b.state_dict()[k]) / 2).bfloat16() for k, v in a.state_dict().items()}
    for k, v in merged.state_dict().items():
        assert torch.equal(v.bfloat16(), expected[k]), k
    # a second merge into the same folder replaces nothing without overwrite
    with pytest.raises(CheckpointError, match="exists already"):
        merge_checkpoints([str(tmp_path / "a"), str(tmp_path / "b")], str(out), SameInitOptions("linear"),
                          progress=False)
