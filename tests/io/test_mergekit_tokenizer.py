"""tokenizer_source, tokenizer: {source, pad_to_multiple_of} and chat_template through mergekit
0.1.5 and through `fastmerge merge --config`, on small LLaMA folders with real (word-level)
tokenizers whose vocabularies differ: the same re-indexed embeddings and LM heads, the same config
vocab_size, the same tokenizer and chat template after loading, or a one-line refusal.
Skipped where mergekit is not installed (it is in the test extra)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

mergekit = pytest.importorskip("mergekit", reason="mergekit is not installed (pip install -e '.[test]')")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402

from fastmerge.cli import main  # noqa: E402
from fastmerge.io import Checkpoint  # noqa: E402

WORDS = [f"w{i}" for i in range(60)]
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
OTHER_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


def _tokenizer(words: list[str], template: str | None):
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                                               eos_token="</s>")
    if template:
        tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """base and a: the base vocabulary (63 tokens); b: 4 words fewer, 3 new ones and the rest in
    another order (a fine-tune with its own tokenizer); c: the base's plus 2 added tokens."""
    root = tmp_path_factory.mktemp("vocab")
    torch.manual_seed(0)
    vocabularies = {
        "base": (WORDS, TEMPLATE),
        "a": (WORDS, TEMPLATE),
        "b": (list(reversed(WORDS[4:])) + ["new0", "new1", "new2"], OTHER_TEMPLATE),
        "c": (WORDS + ["added0", "added1"], OTHER_TEMPLATE),
    }
    for name, (words, template) in vocabularies.items():
        tok = _tokenizer(words, template)
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                                          tie_word_embeddings=False)
        model = transformers.AutoModelForCausalLM.from_config(config)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def _run_both(family, tmp_path, text: str):
    text = text.replace("ROOT", str(family))
    config_path = tmp_path / "merge.yml"
    config_path.write_text(text)
    theirs, ours = tmp_path / "mergekit", tmp_path / "fastmerge"
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(theirs),
              options=MergeOptions(write_model_card=False, quiet=True, random_seed=0))
    rc = main(["merge", "--config", str(config_path), "-o", str(ours), "--quiet"])
    return rc, theirs, ours


def _tensors(folder):
    ckpt = Checkpoint(str(folder))
    return {k: ckpt.read(k).clone() for k in ckpt.keys()}


def _assert_same_model(theirs, ours, ulps: int = 4):
    """The same tensors; the vocabulary tensors compared row by token (a union's added tokens get
    ids in a hash map's order in mergekit)."""
    a, b = _tensors(theirs), _tensors(ours)
    assert sorted(a) == sorted(b)
    va = transformers.AutoTokenizer.from_pretrained(str(theirs)).get_vocab()
    vb = transformers.AutoTokenizer.from_pretrained(str(ours)).get_vocab()
    assert sorted(va) == sorted(vb)
    order = torch.tensor([va[t] for t, _ in sorted(vb.items(), key=lambda item: item[1])])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        head = a[name][order]
        a[name] = torch.cat([head, a[name][len(order):]])
    for name in a:
        assert a[name].shape == b[name].shape, name
        tol = ulps * torch.finfo(torch.float32).eps * float(a[name].abs().max().clamp_min(1e-30))
        assert (a[name].float() - b[name].float()).abs().max() <= tol, name
    ca = json.loads((theirs / "config.json").read_text())
    cb = json.loads((ours / "config.json").read_text())
    assert ca["vocab_size"] == cb["vocab_size"] == a["model.embed_tokens.weight"].shape[0]
    ta = transformers.AutoTokenizer.from_pretrained(str(theirs))
    tb = transformers.AutoTokenizer.from_pretrained(str(ours))
    text = "w5 w7 new1 added0 w59 zzz"
    assert [va[t] for t in tb.convert_ids_to_tokens(tb(text)["input_ids"])] == ta(text)["input_ids"]
    return ta, tb


CONFIGS = {
    # tokens of b missing in a/base: b's rows; base's tokens missing in b: base (the base has them)
    "ties, tokenizer_source base": "merge_method: ties\nbase_model: ROOT/base\nmodels:\n"
                                   "  - model: ROOT/a\n    parameters: {weight: 1, density: 0.7}\n"
                                   "  - model: ROOT/b\n    parameters: {weight: 1, density: 0.7}\n"
                                   "tokenizer_source: base\ndtype: float32\n",
    # b's vocabulary: the 4 words b lacks are not in it; b's new words only b has
    "linear, tokenizer_source b": "merge_method: linear\nmodels:\n  - model: ROOT/a\n    parameters: {weight: 1}\n"
                                  "  - model: ROOT/b\n    parameters: {weight: 2}\n  - model: ROOT/c\n"
                                  "    parameters: {weight: 1}\ntokenizer_source: ROOT/b\ndtype: float32\n",
    # c's added tokens: only c has them; without a base, tokens in two of three models are averaged
    "task arithmetic, tokenizer block c, padded": "merge_method: task_arithmetic\nbase_model: ROOT/base\nmodels:\n"
                                                  "  - model: ROOT/b\n    parameters: {weight: 0.5}\n"
                                                  "  - model: ROOT/c\n    parameters: {weight: 0.5}\n"
                                                  "tokenizer:\n  source: ROOT/c\n  pad_to_multiple_of: 8\n"
                                                  "dtype: float32\n",
    # union: the base's vocabulary and c's two added words (only c adds any: mergekit's order is a set's)
    "ties, union": "merge_method: ties\nbase_model: ROOT/base\nmodels:\n"
                   "  - model: ROOT/a\n    parameters: {weight: 1, density: 0.7}\n"
                   "  - model: ROOT/c\n    parameters: {weight: 1, density: 0.7}\n"
                   "tokenizer_source: union\ndtype: float32\n",
    # (without a base_model, mergekit's "base" of the union is the first of a set: not reproducible)
    "task arithmetic, union, padded": "merge_method: task_arithmetic\nbase_model: ROOT/base\nmodels:\n"
                                      "  - model: ROOT/a\n    parameters: {weight: 0.5}\n"
                                      "  - model: ROOT/b\n    parameters: {weight: 0.5}\n"
                                      "tokenizer:\n  source: union\n  pad_to_multiple_of: 16\ndtype: float32\n",
    # tokens: a new token's row named in another model (model_token), one forced to zeros in every
    # input, one forced to a model's own row
    "task arithmetic, tokens": "merge_method: task_arithmetic\nbase_model: ROOT/a\nmodels:\n"
                      "  - model: ROOT/b\n    parameters: {weight: 1}\n"
                      "  - model: ROOT/c\n    parameters: {weight: 0.5}\n"
                      "tokenizer:\n  source: union\n  tokens:\n"
                      "    new0: {source: {kind: model_token, model: ROOT/a, token: w1}}\n"
                      "    new1: {source: {kind: model_token, model: ROOT/a, token_id: 7}, force: true}\n"
                      "    w10: {source: {kind: zero}, force: true}\n"
                      "    w20: {source: ROOT/b, force: true}\n"
                      "    w2: {source: ROOT/a}\n"
                      "dtype: float32\n",
    # slices (mergekit's gradient SLERP) with a tokenizer: the embeddings come from the first slice's
    # sources, the LM head from the last's
    "slerp slices, tokenizer_source c": "merge_method: slerp\nbase_model: ROOT/a\nslices:\n  - sources:\n"
                                        "      - {model: ROOT/a, layer_range: [0, 1]}\n"
                                        "      - {model: ROOT/c, layer_range: [0, 1]}\n"
                                        "parameters: {t: [0.2, 0.7]}\ntokenizer_source: ROOT/c\n"
                                        "chat_template: auto\ndtype: float32\n",
    # passthrough: a's embeddings (c's added words are in no input of them: zeros), c's LM head
    "passthrough, tokenizer_source c": "merge_method: passthrough\nslices:\n"
                                       "  - sources: [{model: ROOT/a, layer_range: [0, 1]}]\n"
                                       "  - sources: [{model: ROOT/c, layer_range: [0, 1]}]\n"
                                       "tokenizer_source: ROOT/c\nchat_template: auto\ndtype: float32\n",
    "linear, no base, averaged defaults": "merge_method: linear\nmodels:\n  - model: ROOT/a\n"
                                          "    parameters: {weight: 1}\n  - model: ROOT/c\n    parameters: {weight: 1}\n"
                                          "  - model: ROOT/b\n    parameters: {weight: 1}\n"
                                          "tokenizer_source: ROOT/c\ndtype: float32\n",
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_same_vocabulary_merge_as_mergekit(family, tmp_path, name):
    rc, theirs, ours = _run_both(family, tmp_path, CONFIGS[name])
    assert rc == 0
    _assert_same_model(theirs, ours)


def test_the_outputs_load_and_generate_the_same_tokens(family, tmp_path):
    rc, theirs, ours = _run_both(family, tmp_path, CONFIGS["linear, tokenizer_source b"])
    assert rc == 0
    ids = torch.tensor([[1, 5, 9, 20, 40]])
    outs = []
    for folder in (theirs, ours):
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
        with torch.no_grad():
            outs.append(model(ids).logits)
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


@pytest.mark.parametrize("template", ["explicit", "auto", "chatml", "llama3"])
def test_chat_template_renders_as_mergekit(family, tmp_path, template):
    value = {"explicit": json.dumps(OTHER_TEMPLATE), "auto": "auto"}.get(template, template)
    # auto: base and a carry TEMPLATE, c (the tokenizer's source) OTHER_TEMPLATE: the plurality wins
    text = ("merge_method: linear\nmodels:\n  - model: ROOT/base\n    parameters: {weight: 1}\n"
            "  - model: ROOT/a\n    parameters: {weight: 1}\n"
            f"  - model: ROOT/c\n    parameters: {{weight: 1}}\ntokenizer_source: ROOT/c\nchat_template: {value}\n"
            "dtype: float32\n")
    rc, theirs, ours = _run_both(family, tmp_path, text)
    assert rc == 0
    ta, tb = _assert_same_model(theirs, ours)
    messages = [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"}]
    want = ta.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tb.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == want
    assert want.startswith({"explicit": "[user]", "auto": "<user>", "chatml": "<|im_start|>user\nw1 w2",
                            "llama3": "<s><|start_header_id|>user"}[template])


def test_chat_template_without_a_tokenizer_source_keeps_the_base_tokenizer(family, tmp_path):
    text = ("merge_method: linear\nmodels:\n  - model: ROOT/base\n    parameters: {weight: 1}\n"
            f"  - model: ROOT/a\n    parameters: {{weight: 1}}\nchat_template: {json.dumps(OTHER_TEMPLATE)}\n")
    rc, theirs, ours = _run_both(family, tmp_path, text)
    assert rc == 0
    tb = transformers.AutoTokenizer.from_pretrained(str(ours))
    assert tb.chat_template == OTHER_TEMPLATE
    assert tb.get_vocab() == transformers.AutoTokenizer.from_pretrained(str(family / "base")).get_vocab()
    assert not os.path.exists(ours / "chat_template.jinja") or (ours / "chat_template.jinja").read_text() == OTHER_TEMPLATE


@pytest.mark.parametrize("tail, message", [
    ("tokenizer:\n  source: base\n  tokens: {w1: {source: ROOT/c}}\n", "not one of the merged models"),
    ("tokenizer:\n  source: base\n  tokens: {w1: {source: {kind: model_token, model: ROOT/a}}}\n", "model_token"),
    ("tokenizer_source: base\ntokenizer: {source: base}\n", "both given"),
    ("chat_template: chatml2\n", "neither a Jinja template nor a named one"),
    ("tokenizer_source: ROOT/nowhere\n", "not a model folder"),
])
def test_what_fastmerge_does_not_support_is_one_line(family, tmp_path, capsys, tail, message):
    text = "merge_method: linear\nmodels:\n  - model: ROOT/a\n    parameters: {weight: 1}\n" \
           "  - model: ROOT/b\n    parameters: {weight: 1}\n" + tail
    path = tmp_path / "merge.yml"
    path.write_text(text.replace("ROOT", str(family)))
    assert main(["merge", "--config", str(path), "-o", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not os.path.exists(tmp_path / "out")


def test_different_vocabularies_without_a_tokenizer_source_are_refused(family, tmp_path, capsys):
    text = ("merge_method: linear\nmodels:\n  - model: ROOT/a\n    parameters: {weight: 1}\n"
            "  - model: ROOT/c\n    parameters: {weight: 1}\n").replace("ROOT", str(family))
    path = tmp_path / "merge.yml"
    path.write_text(text)
    assert main(["merge", "--config", str(path), "-o", str(tmp_path / "out"), "--quiet"]) != 0
    assert "differ in shape" in capsys.readouterr().err


def test_a_chat_template_without_a_tokenizer_to_hold_it_is_not_saved_with_a_warning(family, tmp_path):
    """mergekit warns and saves no template when no tokenizer is written (--no-copy-tokenizer)."""
    text = ("merge_method: linear\nmodels:\n  - model: ROOT/base\n    parameters: {weight: 1}\n"
            f"  - model: ROOT/a\n    parameters: {{weight: 1}}\nchat_template: {json.dumps(OTHER_TEMPLATE)}\n")
    path = tmp_path / "merge.yml"
    path.write_text(text.replace("ROOT", str(family)))
    with pytest.warns(UserWarning, match="template is not saved"):
        assert main(["merge", "--config", str(path), "-o", str(tmp_path / "out"), "--quiet",
                     "--no-copy-tokenizer"]) == 0
    assert not os.path.exists(tmp_path / "out" / "tokenizer_config.json")


def test_dry_run_names_the_tokenizer_and_no_copy_tokenizer_still_writes_it(family, tmp_path, capsys):
    path = tmp_path / "merge.yml"
    path.write_text(CONFIGS["linear, tokenizer_source b"].replace("ROOT", str(family)))
    assert main(["merge", "--config", str(path), "-o", str(tmp_path / "out"), "--dry-run"]) == 0
    assert f"tokenizer: {family / 'b'}" in capsys.readouterr().out
    assert not os.path.exists(tmp_path / "out")
    assert main(["merge", "--config", str(path), "-o", str(tmp_path / "out"), "--quiet", "--no-copy-tokenizer"]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert tok.get_vocab() == transformers.AutoTokenizer.from_pretrained(str(family / "b")).get_vocab()
