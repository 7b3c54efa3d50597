"""A merged checkpoint folder that Hugging Face `from_pretrained` loads: next to the weights, the
source model's config (its dtype updated to the output's), generation config and tokenizer files,
and a short model card naming the inputs, the method and its parameters (as mergekit writes them).
Each file is written atomically; nothing is written when the source has no config.json."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence

import torch

from ..errors import CheckpointError
from .atomic import atomic_path, write_text_atomic

CONFIG_NAME = "config.json"
# copied as they are when the source folder has them
COPIED = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
          "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
          "chat_template.json")


def source_folder(path: str) -> str | None:
    """The folder of a checkpoint path that holds its config.json, or None."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    return folder if os.path.isfile(os.path.join(folder, CONFIG_NAME)) else None


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


def write_folder_files(output: str, source: str, *, dtype: torch.dtype | None, card: str) -> list[str]:
    """config.json (torch_dtype set to `dtype` when given), the generation config, tokenizer files
    and README.md (the card) from folder `source` into folder `output`; returns the files written."""
    written = []
    try:
        with open(os.path.join(source, CONFIG_NAME)) as f:
            config = json.load(f)
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{source}/{CONFIG_NAME}: cannot copy it to the merged model ({exc})") from None
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        config["torch_dtype"] = name
        if "dtype" in config:  # newer transformers write this key
            config["dtype"] = name
    written.append(write_text_atomic(os.path.join(output, CONFIG_NAME), json.dumps(config, indent=2) + "\n"))
    for name in COPIED:
        src = os.path.join(source, name)
        if os.path.isfile(src):
            with atomic_path(os.path.join(output, name)) as tmp:
                shutil.copyfile(src, tmp)
            written.append(os.path.join(output, name))
    written.append(write_text_atomic(os.path.join(output, "README.md"), card))
    return written
