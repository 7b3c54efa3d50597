"""Hugging Face checkpoint folders merged on data from the command line, without model code:
`fastmerge merge a/ b/ --align cca --data corpus.txt -o out/` builds each model from config.json,
tokenises the corpus with the folder's tokenizer and writes a folder transformers loads."""

import copy
import json
import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import fastmerge  # noqa: E402
from fastmerge.cli import main  # noqa: E402
from fastmerge.datasets import load_text  # noqa: E402
from fastmerge.errors import DataError  # noqa: E402
from fastmerge.io.text import TextBatches  # noqa: E402
from fastmerge.spec import trace_spec  # noqa: E402
from fastmerge.spec.residual import canonical_spec, canonical_state, ones_complement, residual_groups  # noqa: E402
from fastmerge.spec.transforms import Dense, apply_transforms  # noqa: E402

VOCAB = 300


def _tokenizer():
    """A byte-level BPE tokenizer trained here on a little stdlib text (no downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = bytes(load_text().fit[:200_000].tolist()).decode("utf-8", errors="replace")
    tok.train_from_iterator([text], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def _config(kind):
    if kind == "llama":
        return transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                        tie_word_embeddings=False, max_position_embeddings=64)
    return transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                                   tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)


def _nontrivial_norms(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name or name.startswith("transformer.ln_f"):
                p.copy_((0.5 + torch.rand_like(p)) if name.endswith("weight") else 0.2 * torch.randn_like(p))
    return model


def _rotated_copy(model, inputs, seed=1):
    """The model in canonical form, its residual stream rotated and every other group permuted."""
    spec = trace_spec(model, inputs)
    groups, refused = residual_groups(spec)
    assert groups and not refused, refused
    cspec = canonical_spec(spec, groups)
    gen = torch.Generator().manual_seed(seed)
    transforms = cspec.random_permutations(gen)
    for name, r in groups.items():
        size = cspec.group(name).size
        if r.kind == "rms":
            q, _ = torch.linalg.qr(torch.randn(size, size, dtype=torch.float64, generator=gen))
        else:
            basis = ones_complement(size)
            inner, _ = torch.linalg.qr(torch.randn(size - 1, size - 1, dtype=torch.float64, generator=gen))
            q = basis @ inner @ basis.T + torch.full((size, size), 1.0 / size, dtype=torch.float64)
        transforms[name] = Dense(out=q[None], inp=q.T[None])
    twin = copy.deepcopy(model)
    twin.load_state_dict(apply_transforms(cspec, canonical_state(spec, model.state_dict(), groups), transforms))
    return twin


@pytest.fixture(scope="module")
def tokenizer():
    return _tokenizer()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_bytes(bytes(load_text().val[:60_000].tolist()))
    return str(path)


def _save(model, tokenizer, folder):
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_cli_merges_a_rotated_copy_of_a_folder_back_to_the_model(tmp_path, tokenizer, corpus, kind):
    torch.manual_seed(0)
    model = _nontrivial_norms(transformers.AutoModelForCausalLM.from_config(_config(kind))).eval()
    ids = torch.tensor([tokenizer("def merge(a, b):\n    return a")["input_ids"]])
    twin = _rotated_copy(model, (ids,))
    with torch.no_grad():
        want = model(ids).logits
        assert torch.allclose(twin(ids).logits, want, atol=1e-4)  # the same function, other weights
    a, b = _save(model, tokenizer, tmp_path / "a"), _save(twin, tokenizer, tmp_path / "b")
    out = tmp_path / "merged"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # q/k dims are weight-matched: reported as a fallback, expected
        assert main(["merge", a, b, "--align", "cca", "--data", corpus, "--seq-len", "32", "--batch-size", "8",
                     "--max-batches", "8", "-o", str(out), "--quiet"]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        got = merged(ids).logits
    assert (got - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max()))
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()


def test_the_python_api_merges_hugging_face_models_without_a_spec():
    """Exported without a key/value cache (which torch.export cannot capture); the stream norms of
    Hugging Face's own RMSNorm modules are recognised, so CCA aligns the stream orthogonally."""
    torch.manual_seed(0)
    a = _nontrivial_norms(transformers.AutoModelForCausalLM.from_config(_config("llama"))).eval()
    b = _nontrivial_norms(transformers.AutoModelForCausalLM.from_config(_config("llama"))).eval()
    ids = torch.randint(0, VOCAB, (4, 16))
    merged = fastmerge.merge([a, b], "weight_matching", example_inputs=(ids,), progress=False)
    assert merged.config.use_cache == a.config.use_cache  # the flag is restored after the export
    spec = trace_spec(a, (ids,))
    assert [n.kind for n in spec.norms] == ["rms"] * 5 and all(n.readers for n in spec.norms)
    data = [(torch.randint(0, VOCAB, (8, 16)),) for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, alignment = fastmerge.merge([a, b], "cca", data=data, progress=False, return_alignment=True)
    assert alignment.diagnostics["model"]["transform"].startswith("orthogonal")


def test_text_batches_are_windows_of_the_corpus_and_can_be_read_again(tmp_path, tokenizer, corpus):
    batches = TextBatches(corpus, tokenizer, seq_len=16, batch_size=4, max_batches=3)
    first, second = list(batches), list(batches)
    assert len(first) == 3 and all(torch.equal(x, y) for (x, _), (y, _) in zip(first, second))
    x, y = first[0]
    assert x.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])  # targets are the next tokens
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(json.dumps({"text": "import os\n" * 50}) + "\n" + json.dumps({"id": 3}) + "\n")
    with pytest.raises(DataError, match="docs.jsonl:2: each line must be a JSON object with a string 'text'"):
        list(TextBatches(str(jsonl), tokenizer, seq_len=8, batch_size=100, max_batches=1))
    short = tmp_path / "short.txt"
    short.write_text("x = 1\n")
    with pytest.raises(DataError, match="fewer than one window"):
        list(TextBatches(str(short), tokenizer, seq_len=64, batch_size=2))


def test_a_text_corpus_needs_a_folder_with_a_tokenizer(tmp_path, corpus, capsys):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config("llama"))
    a = str(tmp_path / "a")
    model.save_pretrained(a)  # no tokenizer saved
    capsys.readouterr()  # transformers' own progress output
    code = main(["merge", a, a, "--align", "cca", "--data", corpus, "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no usable tokenizer" in err[0]


def test_text_flags_without_a_text_corpus_are_refused(tmp_path, capsys):
    torch.manual_seed(0)
    a = str(tmp_path / "a")
    transformers.AutoModelForCausalLM.from_config(_config("llama")).save_pretrained(a)
    capsys.readouterr()
    code = main(["merge", a, a, "--align", "permute", "--data", "digits", "--seq-len", "32",
                 "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--seq-len applies to a text corpus" in err[0]
    assert not (tmp_path / "out").exists()
