"""A merge config's `tokenizer_source` (or `tokenizer: {source, tokens, pad_to_multiple_of}`): the output
gets one tokenizer, and every input's vocabulary tensors (embeddings, LM head) are re-indexed to
its vocabulary by token string before the merge, as mergekit 0.1.5 does:

- row t of an input is the input's own row for the token (looked up in the input's tokenizer,
  among its first config.vocab_size ids);
- a token an input lacks takes a default row, the same for every input: the row of the one input
  that has it, else the base model's row when the base has it, else the mean of the rows of the
  inputs that have it; a token no input has gets zeros (with a warning);
- with pad_to_multiple_of, the vocabulary is padded with the mean row of each input.

Vocabulary tensors are the 2-D tensors whose first axis is the model's config.vocab_size (a tied
LM head has no tensor of its own). The output's config.json gets the new vocab_size and its
tokenizer files come from the source folder. Sources: "base" (the base model, else the first
model), a model folder, or "union": the base's tokenizer extended by every other model's tokens
(mergekit's construction; mergekit adds them in a hash map's order, which changes between runs:
fastmerge by model in the config's order, by id within a model, so the same tokens, rows by
token the same, ids possibly permuted). `tokenizer.tokens` names a token's row where an input
lacks it (every input's with `force`): a model's row of the token, a model's named row
(`model_token`: token or token_id in that model's own vocabulary), or zeros.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import CheckpointError, InvalidArgumentError
from ..io.hf_folder import read_config, source_folder
from .chat_templates import NAMED_TEMPLATES

# the default row of a token some inputs lack: ("model", i) one input's row of it, ("row", i, r) row r
# of input i, ("mean", (i, ...)) the mean of those inputs' rows of it, or ("zero",)
Default = tuple


@dataclass
class VocabularyPlan:
    """How each input's vocabulary tensors are re-indexed (inputs in merge order, the base last)."""

    folder: str  # the tokenizer's folder: the output's tokenizer files come from it
    size: int  # rows of the output's vocabulary tensors (padded)
    vocab: int  # tokens in the output's vocabulary
    names: frozenset[str]  # the vocabulary tensors
    rows: list[torch.Tensor]  # per input, (vocab,) source row per output token, -1 where it lacks one
    defaults: dict[int, Default] = field(default_factory=dict)  # output token -> its default row
    forced: frozenset[int] = frozenset()  # tokens every input takes the default row of (tokens' force)

    def remap(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Every input's tensor (the same order as `rows`) with `size` rows, as module docstring."""
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        fill = {}
        for token, rule in self.defaults.items():
            if rule[0] == "model":
                i = rule[1]
                fill[token] = tensors[i][int(self.rows[i][token])].to(dtype)
            elif rule[0] == "row":  # a named row of one input (tokenizer.tokens' model_token)
                fill[token] = tensors[rule[1]][rule[2]].to(dtype)
            elif rule[0] == "mean":
                total = torch.zeros(tensors[0].shape[1:], dtype=dtype)
                for i in rule[1]:
                    total = total + tensors[i][int(self.rows[i][token])].to(dtype)
                fill[token] = total / len(rule[1])
            else:
                fill[token] = torch.zeros(tensors[0].shape[1:], dtype=dtype)
        out = []
        for t, rows in zip(tensors, self.rows):
            new = torch.zeros((self.size, *t.shape[1:]), dtype=dtype)
            present = (rows >= 0).nonzero().flatten()
            new[present] = t[rows[present]].to(dtype)
            for token, row in fill.items():
                if rows[token] < 0 or token in self.forced:
                    new[token] = row
            if self.size > self.vocab:  # padding rows: the mean row
                new[self.vocab:] = new[: self.vocab].mean(0)
            out.append(new)
        return out


def _load_tokenizer(folder: str):
    try:
        import transformers
    except ImportError:
        raise InvalidArgumentError("tokenizer_source needs transformers to read the tokenizers: pip install "
                                   "transformers") from None
    try:
        return transformers.AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for a folder it cannot read
        raise CheckpointError(f"tokenizer_source: {folder}: cannot load its tokenizer ({str(exc)[:200]})") from None


def _tokenizer_vocab(folder: str) -> dict[str, int]:
    """A folder's tokenizer vocabulary (token -> id). Read once per folder state: the plans of one
    merge read the same tokenizers several times (the output's, each input's, both ends of slices),
    and loading a large tokenizer takes about a second; the key holds the files' modification times."""
    files = tuple(sorted((n, os.stat(os.path.join(folder, n)).st_mtime_ns) for n in _TOKENIZER_FILES
                         if os.path.isfile(os.path.join(folder, n))))
    return dict(_cached_vocab(os.path.realpath(folder), files))


@functools.lru_cache(maxsize=16)
def _cached_vocab(folder: str, files: tuple) -> dict[str, int]:
    return dict(_load_tokenizer(folder).get_vocab())


def _union_tokenizer(folders: Sequence[str], base: str) -> str:
    """mergekit's union vocabulary, saved in a temporary folder (removed at exit): the base's
    tokenizer, then every other model's tokens (below its config.vocab_size) that the base lacks,
    in the order the models are listed and by id within a model (mergekit's order is a hash map's,
    not reproducible), added as plain tokens, then every model's added tokens with their settings
    (the first model's settings where they differ)."""
    base_tokenizer = _load_tokenizer(base)
    ordered = [base] + [f for f in dict.fromkeys(folders) if f != base and _has_tokenizer(f)]
    base_vocab = base_tokenizer.get_vocab()
    plain: dict[str, None] = {}
    added: dict[str, object] = {}
    for folder in ordered:
        tokenizer = base_tokenizer if folder == base else _load_tokenizer(folder)
        limit = _vocab_size(folder)
        # by id: mergekit takes get_vocab()'s order, a hash map's (it changes from process to process)
        for token, index in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
            if index < limit:
                plain.setdefault(token, None)
        for index, info in tokenizer.added_tokens_decoder.items():
            if index < limit:
                added.setdefault(info.content, info)
    union = _load_tokenizer(base)  # a fresh copy to extend
    for token in plain:
        if token not in added and token not in base_vocab:
            union.add_tokens(token)
    for info in added.values():
        union.add_tokens(info)
    folder = tempfile.mkdtemp(prefix="fastmerge-union-tokenizer-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    union.save_pretrained(folder)
    return folder


def _vocab_size(folder: str) -> int:
    value = read_config(folder).get("vocab_size")
    if not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"{folder}/config.json: no vocab_size; tokenizer_source needs it to find the vocabulary "
                              "tensors")
    return value


def model_folder(path: str) -> str:
    """The Hugging Face folder of a model path (its config.json and tokenizer)."""
    found = source_folder(path)
    if found is None:
        raise CheckpointError(f"{path}: tokenizer_source needs Hugging Face model folders (config.json and tokenizer "
                              "next to the weights)")
    return found


def tokenizer_folder(source: str, folders: Sequence[str], base_folder: str) -> str:
    """The folder of the output's tokenizer: the base's ("base"), a union of `folders`' built on
    the base's ("union", in a temporary folder) or the folder `source` names."""
    if source in ("base", "union") and max(_tokenizer_vocab(base_folder).values(), default=-1) >= _vocab_size(base_folder):
        raise InvalidArgumentError(f"tokenizer_source: {source}: {base_folder}'s tokenizer has ids past its config's "
                                   "vocab_size (mergekit strips them from BPE tokenizers); fastmerge does not, give "
                                   "the tokenizer of the size you want as a model path")
    if source == "union":
        return _union_tokenizer(folders, base_folder)
    if source == "base":
        return base_folder
    if not os.path.isdir(source):
        raise CheckpointError(f"tokenizer_source {source}: not a model folder")
    return source


def plan_vocabulary(folders: Sequence[str], shapes: Sequence[dict], source: str, *, base_index: int | None,
                    pad_to_multiple_of: int | None = None, tokens: Mapping[str, dict] | None = None) -> VocabularyPlan:
    """The plan for inputs in `folders` (model folders, merge order, the base last when
    `base_index` is given) with tensor `shapes` each; `source`: "base", "union" or a model folder;
    `tokens`: tokenizer.tokens as the config reader gives them ({token: {kind: model | zero |
    model_token, model, token, token_id, force}}): a token's row where an input lacks it (every
    input's with force)."""
    folder = tokenizer_folder(source, folders, folders[base_index if base_index is not None else 0])
    vocab_out = _tokenizer_vocab(folder)
    sizes = [_vocab_size(f) for f in folders]
    names = sorted(n for n, s in shapes[0].items() if len(s) == 2 and s[0] == sizes[0])
    if not names:
        raise CheckpointError(f"{folders[0]}: no tensor has config.vocab_size ({sizes[0]}) rows; tokenizer_source "
                              "needs the embedding/LM head")
    for f, shape, size in zip(folders, shapes, sizes):
        for n in names:
            s = shape.get(n)
            if s is None or len(s) != 2 or s[0] != size or s[1] != shapes[0][n][1]:
                raise CheckpointError(f"{f}: tensor {n!r} has shape {s}, expected ({size}, {shapes[0][n][1]}) "
                                      "(its config's vocab_size rows)")
    vocab = len(vocab_out)
    size = vocab
    if pad_to_multiple_of and size % pad_to_multiple_of:
        size += pad_to_multiple_of - size % pad_to_multiple_of
    rows = []
    own_vocabs: dict[str, dict[str, int]] = {folder: vocab_out}
    for f, n in zip(folders, sizes):
        if f not in own_vocabs:
            own_vocabs[f] = _tokenizer_vocab(f) if _has_tokenizer(f) else _assumed(f, folders[base_index or 0],
                                                                                   own_vocabs)
        model_vocab = own_vocabs[f]
        r = torch.full((vocab,), -1, dtype=torch.long)
        for token, index in vocab_out.items():
            own = model_vocab.get(token)
            if own is not None and own < n:
                r[index] = own
        rows.append(r)
    defaults: dict[int, Default] = {}
    have = torch.stack([r >= 0 for r in rows])  # (inputs, vocab)
    configured = _configured(tokens or {}, vocab_out, folders, own_vocabs, rows, sizes)
    forced = frozenset(t for t, (_, force) in configured.items() if force)
    missing = sorted(set((~have.all(0)).nonzero().flatten().tolist()) | forced)
    absent = []
    for token in missing:
        holders = have[:, token].nonzero().flatten().tolist()
        if token in configured:
            defaults[token] = configured[token][0]
        elif len(holders) == 1:
            defaults[token] = ("model", holders[0])
        elif not holders:
            defaults[token] = ("zero",)
            absent.append(token)
        elif base_index is not None and have[base_index, token]:
            defaults[token] = ("model", base_index)
        else:
            defaults[token] = ("mean", tuple(holders))
    if absent:
        words = {i: t for t, i in vocab_out.items()}
        warnings.warn(f"tokenizer_source: {len(absent)} token(s) of the output vocabulary are in no model "
                      f"(e.g. {words[absent[0]]!r}); their rows are zeros", stacklevel=3)
    return VocabularyPlan(folder=folder, size=size, vocab=vocab, names=frozenset(names), rows=rows,
                          defaults=defaults, forced=forced)


def _configured(tokens: Mapping[str, dict], vocab_out: dict[str, int], folders: Sequence[str], own_vocabs: dict,
                rows: list[torch.Tensor], sizes: list[int]) -> dict[int, tuple[Default, bool]]:
    """tokenizer.tokens as {output token id: (default rule, force)}; tokens outside the output
    vocabulary are ignored, as mergekit ignores them."""
    index = {os.path.realpath(f): i for i, f in reversed(list(enumerate(folders)))}
    out = {}
    for token, cfg in tokens.items():
        if token not in vocab_out:
            continue
        tid = vocab_out[token]
        if cfg["kind"] == "zero":
            out[tid] = (("zero",), cfg["force"])
            continue
        folder = source_folder(cfg["model"])
        i = index.get(os.path.realpath(folder)) if folder else None
        if i is None:
            raise InvalidArgumentError(f"tokenizer.tokens[{token!r}]: {cfg['model']} is not one of the merged models")
        if cfg["kind"] == "model":
            if rows[i][tid] < 0:
                raise InvalidArgumentError(f"tokenizer.tokens[{token!r}]: {cfg['model']} has no token {token!r}")
            out[tid] = (("model", i), cfg["force"])
            continue
        src = cfg["token_id"] if cfg.get("token_id") is not None else own_vocabs[folders[i]].get(cfg["token"])
        if src is None or not 0 <= src < sizes[i]:
            raise InvalidArgumentError(f"tokenizer.tokens[{token!r}]: {cfg['model']} has no row for "
                                       f"{cfg.get('token') if cfg.get('token_id') is None else cfg['token_id']!r}")
        out[tid] = (("row", i, int(src)), cfg["force"])
    return out


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                    "added_tokens.json", "special_tokens_map.json", "vocab.txt")


def _has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, n)) for n in _TOKENIZER_FILES[:4])


def _assumed(folder: str, base: str, known: dict) -> dict[str, int]:
    """mergekit: a model without a tokenizer is assumed to share the base's (with a warning)."""
    warnings.warn(f"{folder} has no tokenizer: assumed to be {base}'s (as mergekit does)", stacklevel=4)
    if base not in known:
        known[base] = _tokenizer_vocab(base)
    return known[base]


def output_config(config: dict, plan: VocabularyPlan) -> dict:
    """The merged model's config.json: the output vocabulary's size."""
    return {**config, "vocab_size": plan.size}


def chat_template_text(template: str, folders: Sequence[str]) -> str | None:
    """A config's chat_template as the text to store: "auto" (the template most of `folders`'
    tokenizers carry, ties to the first listed; None when none has one), one of mergekit's named
    templates (fastmerge's own text for each, rendering as mergekit's: chat_templates.py) or the
    Jinja text itself."""
    if template == "auto":
        found = [t for t in (_folder_template(f) for f in folders) if t]
        if not found:
            return None
        return max(found, key=found.count)  # max keeps the first of equal counts
    if template in NAMED_TEMPLATES:  # names hold no braces or newlines, so no template text is one
        return NAMED_TEMPLATES[template]
    if "{" not in template or len(template) < 20:
        raise InvalidArgumentError(f"chat_template: {template[:40]!r} is neither a Jinja template nor a named one "
                                   f"({', '.join(sorted(NAMED_TEMPLATES))}); give one of those, the template's text "
                                   "or auto")
    return template


def output_template(chat_template: str | None, folders: Sequence[str], *, output: str, source: str | None,
                    tokenizer_folder: str | None, copy_tokenizer: bool) -> str | None:
    """The chat template text a merge writes (None: none), checked before any work: a model folder
    as the output, a tokenizer_config.json to hold it. Without a tokenizer to write (no
    tokenizer_source, --no-copy-tokenizer) it is not saved, with a warning, as mergekit warns."""
    if chat_template is None:
        return None
    if source is None:
        raise CheckpointError(f"{output}: chat_template writes a model folder; give a folder as the output, not a "
                              ".safetensors file")
    template = chat_template_text(chat_template, folders)
    if template is None:
        return None
    if tokenizer_folder is None and not copy_tokenizer:
        warnings.warn("chat_template: the tokenizer is not copied (--no-copy-tokenizer), so the template is not saved",
                      stacklevel=3)
        return None
    holder = tokenizer_folder or source
    if not os.path.isfile(os.path.join(holder, "tokenizer_config.json")):
        raise CheckpointError(f"chat_template: {holder} has no tokenizer_config.json to hold it")
    return template


def _folder_template(folder: str) -> str | None:
    """The chat template a tokenizer folder carries (chat_template.jinja, else tokenizer_config.json's
    chat_template, its "default" when it holds several), stripped as mergekit compares them."""
    path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None
    template = None
    for name in ("chat_template.json", "tokenizer_config.json"):  # the first that has one
        path = os.path.join(folder, name)
        try:
            with open(path, encoding="utf-8") as f:
                template = json.load(f).get("chat_template")
        except (OSError, ValueError, AttributeError):
            continue
        if template:
            break
    if isinstance(template, list):  # [{"name": ..., "template": ...}]
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    elif isinstance(template, dict):
        template = template.get("default")
    return template.strip() if isinstance(template, str) and template.strip() else None
