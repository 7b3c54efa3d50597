"""A merged checkpoint folder that Hugging Face `from_pretrained` loads: next to the weights, the
source model's config (its dtype updated to the output's), generation config and tokenizer files,
and a short model card naming the inputs, the method and its parameters (as mergekit writes them).
Each file is written atomically; nothing is written when the source has no config.json."""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Mapping, Sequence

import torch

from ..errors import CheckpointError
from .atomic import atomic_path, write_text_atomic
from .lora import split_reference

CONFIG_NAME = "config.json"
# copied as they are when the source folder has them
GENERATION_CONFIG = "generation_config.json"
COPIED = (GENERATION_CONFIG, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
          "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
          "chat_template.json")


def source_folder(path: str) -> str | None:
    """The folder of a checkpoint path that holds its config.json, or None (a model+lora
    reference: the model's)."""
    reference = split_reference(path)
    path = reference[0] if reference else path
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    # lexists: a config.json that is not a regular file (a FIFO, a dangling link) is refused by
    # read_config, not skipped
    return folder if os.path.lexists(os.path.join(folder, CONFIG_NAME)) else None


def model_card(inputs: Sequence[str], method: str, parameters: Mapping[str, object], base: str | None) -> str:
    front = ["---", "library_name: transformers", "tags:", "- merge", "- fastmerge"]
    if base:
        front += [f"base_model: {os.path.basename(os.path.abspath(base))}"]
    lines = front + ["---", "", "# Merged model", "",
                     f"Merged with fastmerge by **{method}**.", "",
                     "Inputs:", ""]
    lines += [f"- {os.path.basename(os.path.abspath(p))}" for p in inputs]
    if base:
        lines += ["", f"Base model: {os.path.basename(os.path.abspath(base))}"]
    lines += ["", "Parameters:", "", "```json", json.dumps(dict(parameters), indent=1, default=str), "```", ""]
    return "\n".join(lines)


MAX_CONFIG_BYTES = 16 << 20  # a model's config.json is a few KiB


def read_config(source: str) -> dict:
    """The config.json of folder `source`, checked before any work (a config that cannot be copied
    must fail the merge before its weights are published): a regular file, JSON, an object."""
    path = os.path.join(source, CONFIG_NAME)
    try:
        # O_NONBLOCK: a FIFO planted under the name is refused by the check below, not waited on
        with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK)) as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ValueError("not a regular file")
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ValueError(f"over {MAX_CONFIG_BYTES >> 20} MiB")
        config = json.loads(raw.decode("utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{path}: cannot copy it to the merged model ({str(exc)[:200]})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: cannot copy it to the merged model (nested too deeply)") from None
    return config


TOKENIZER_CONFIG = "tokenizer_config.json"
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")  # they override tokenizer_config's template


def copied_files(source: str, copy_tokenizer: bool = True, tokenizer_folder: str | None = None,
                 chat_template: str | None = None) -> list[tuple[str, str]]:
    """(folder, name) of the files a merged folder gets as they are: the generation config of
    `source`, the tokenizer files of `source` (with copy_tokenizer) or of `tokenizer_folder` (a
    tokenizer_source: always, as mergekit writes it); with a `chat_template` of its own, not the
    template files it replaces."""
    out = [(source, GENERATION_CONFIG)] if os.path.isfile(os.path.join(source, GENERATION_CONFIG)) else []
    if copy_tokenizer or tokenizer_folder is not None:
        folder = tokenizer_folder or source
        out += [(folder, n) for n in COPIED if n != GENERATION_CONFIG and os.path.isfile(os.path.join(folder, n))
                and not (chat_template is not None and n in TEMPLATE_FILES)]
    return out


def write_folder_files(output: str, source: str, config: dict, *, dtype: torch.dtype | None, card: str | None,
                       copy_tokenizer: bool = True, tokenizer_folder: str | None = None,
                       chat_template: str | None = None) -> list[str]:
    """config.json (`config`, read by read_config, with torch_dtype set to `dtype` when given), the
    generation config, tokenizer files (copied_files) and README.md (the card, unless None) from folder `source` into folder
    `output`; `chat_template` (text) replaces the tokenizer's; returns the files written."""
    written = []
    config = dict(config)
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        config["torch_dtype"] = name
        if "dtype" in config:  # newer transformers write this key
            config["dtype"] = name
    written.append(write_text_atomic(os.path.join(output, CONFIG_NAME), json.dumps(config, indent=2) + "\n"))
    for folder, name in copied_files(source, copy_tokenizer, tokenizer_folder, chat_template):
        target = os.path.join(output, name)
        if name == TOKENIZER_CONFIG and chat_template is not None:
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                settings = json.load(f)
            settings["chat_template"] = chat_template
            written.append(write_text_atomic(target, json.dumps(settings, indent=2, ensure_ascii=False) + "\n"))
            continue
        with atomic_path(target) as tmp:
            shutil.copyfile(os.path.join(folder, name), tmp)
        written.append(target)
    if card is not None:
        written.append(write_text_atomic(os.path.join(output, "README.md"), card))
    return written
