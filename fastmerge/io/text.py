"""Token batches from a local text corpus, tokenised with a Hugging Face checkpoint folder's own
tokenizer: what `fastmerge merge a/ b/ --align cca --data corpus.txt` collects statistics on.

A `.txt` file is one text; a `.jsonl` file holds one JSON object per line whose "text" field is a
document (other fields are ignored; a line that is not an object with a string "text" is an
error naming the line). Documents are tokenised as they are read, joined by the tokenizer's end
of sequence token, and cut into windows of `seq_len` tokens; at most `max_batches` batches of
`batch_size` windows are made, so memory stays bounded whatever the file's size. The batches can
be iterated more than once (the file is read again): statistics, checks and NP Merge each take
their pass.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import torch

from ..errors import DataError, InvalidArgumentError

TEXT_SUFFIXES = (".txt", ".jsonl")


def is_text_file(reference: str) -> bool:
    return reference.endswith(TEXT_SUFFIXES) and os.path.isfile(reference)


def load_tokenizer(folder: str):
    """The tokenizer saved in a Hugging Face checkpoint folder (local files only)."""
    try:
        import transformers
    except ImportError:
        raise InvalidArgumentError("tokenising a text corpus needs the transformers package "
                                   "(pip install transformers)") from None
    try:
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a folder without a tokenizer
        raise InvalidArgumentError(f"{folder}: no usable tokenizer to tokenise the text corpus with "
                                   f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]}); save the "
                                   "tokenizer into the folder (tokenizer.save_pretrained)") from None


class TextBatches:
    """Re-iterable (input_ids, next-token targets) batches of a text corpus (module docstring)."""

    def __init__(self, path: str, tokenizer, *, seq_len: int = 128, batch_size: int = 16, max_batches: int = 64):
        if seq_len < 2 or batch_size < 1 or max_batches < 1:
            raise InvalidArgumentError(f"text batches need seq_len >= 2, batch_size >= 1 and max_batches >= 1, got "
                                       f"{seq_len}, {batch_size}, {max_batches}")
        if not os.path.isfile(path):
            raise InvalidArgumentError(f"--data {path}: no such file")
        self.path, self.tokenizer = path, tokenizer
        self.seq_len, self.batch_size, self.max_batches = seq_len, batch_size, max_batches
        vocab = getattr(tokenizer, "vocab_size", None)
        self.vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else vocab

    def _documents(self) -> Iterator[str]:
        with open(self.path, encoding="utf-8", errors="replace") as f:
            if self.path.endswith(".txt"):
                while True:  # chunks of whole lines: a word is never cut in two before tokenising
                    chunk = f.read(1 << 16)
                    if not chunk:
                        return
                    yield chunk if chunk.endswith("\n") else chunk + f.readline()
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{self.path}:{number}: not a JSON line ({exc.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise DataError(f"{self.path}:{number}: each line must be a JSON object with a string 'text'")
                yield record["text"]

    def _tokens(self) -> Iterator[int]:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        for doc in self._documents():
            ids = self.tokenizer(doc, add_special_tokens=False)["input_ids"]
            yield from ids
            if eos is not None and not self.path.endswith(".txt"):
                yield eos

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        window = self.seq_len + 1
        need = window * self.batch_size
        buffer: list[int] = []
        made = 0
        for token in self._tokens():
            buffer.append(token)
            if len(buffer) == need:
                yield self._batch(buffer)
                buffer = []
                made += 1
                if made == self.max_batches:
                    return
        if made == 0:
            if len(buffer) >= window:  # a short corpus: the windows it has
                yield self._batch(buffer[: len(buffer) // window * window])
                return
            raise DataError(f"{self.path}: {len(buffer)} tokens, fewer than one window of {window}; give a longer "
                            "text or a smaller --seq-len")

    def _batch(self, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.tensor(tokens, dtype=torch.long).view(-1, self.seq_len + 1)
        if self.vocab is not None and int(t.max()) >= self.vocab:
            raise DataError(f"{self.path}: the tokenizer made token id {int(t.max())} outside its vocabulary "
                            f"({self.vocab})")
        return t[:, :-1], t[:, 1:]

    def __len__(self) -> int:
        return self.max_batches  # at most: for progress bars
