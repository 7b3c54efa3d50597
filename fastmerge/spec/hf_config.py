"""Merge specs for Hugging Face checkpoints without the user's model code.

The architecture named by the checkpoint's ``config.json`` is built by the transformers library
(random weights, no downloads), traced with fastmerge.trace_spec, and the spec is kept to the
tensors the checkpoint holds (a tied ``lm_head.weight`` that the file leaves
out, for instance). Works for the architectures the tracer handles (GPT-2, BERT and the
LLaMA family with grouped-query attention among them).

The model is built on the CPU at full size: a trace on the meta device (no memory) was tried and
gave unsound specs for Hugging Face attention (check_spec failed on the real model), so this costs
one model's memory in float32 while the spec is made.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import torch

from ..errors import CheckpointError
from .trace import trace_spec


def config_folder(path: str) -> str:
    """The folder holding config.json for a checkpoint path (a folder, a file or an index in it)."""
    path = os.fspath(path)
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    if not os.path.exists(os.path.join(folder, "config.json")):
        raise CheckpointError(f"{path}: no config.json next to the checkpoint; give the spec as YAML (spec_file=FILE)")
    return folder


def _transformers():
    try:
        import transformers  # optional dependency: only these paths need it
    except ImportError:
        raise CheckpointError("building a model from config.json needs the transformers package "
                              "(pip install transformers), or give the spec as YAML (spec_file=FILE)") from None
    return transformers


def _config(transformers, folder: str):
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers' validators raise their own types on a bad file
        raise CheckpointError(f"{folder}/config.json: not a usable Hugging Face config "
                              f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    if hasattr(config, "use_cache"):
        config.use_cache = False  # no key/value cache: nothing to export or keep
    return config


def model_builder(folder: str, shapes: Mapping[str, Sequence[int]]):
    """A function building (random weights, eval mode) the transformers model of `folder`'s
    config.json whose tensor names are the checkpoint's (`shapes`): the architecture for merges on
    data without the user's model code."""
    transformers = _transformers()
    config = _config(transformers, folder)
    cls, own, rename = _matching_class(transformers, config, shapes)
    moved = next((n for n in own if rename(n) != n), None)
    if moved is not None:
        raise CheckpointError(f"{folder}: the checkpoint names its tensors differently from the model transformers "
                              f"builds from config.json ({moved!r} is {rename(moved)!r} in the files); give the "
                              "architecture with --model MODULE:ATTR")

    def build():
        model = cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)
        return model.eval()

    return build


def spec_from_config(folder: str, shapes: Mapping[str, Sequence[int]]):
    """The merge spec of the Hugging Face model in `folder`, restricted to the tensors in `shapes`."""
    transformers = _transformers()
    config = _config(transformers, folder)
    model, rename = _build_matching(transformers, config, shapes)
    model.eval()
    ids = torch.zeros((1, 8), dtype=torch.long)
    spec = trace_spec(model, (ids,))
    groups = []
    for g in spec.groups:
        members = tuple(dataclasses.replace(m, tensor=rename(m.tensor)) for m in g.members if rename(m.tensor) in shapes)
        if members:
            groups.append(dataclasses.replace(g, members=members))
    spec = dataclasses.replace(spec, groups=groups)
    spec.validate(shapes)
    return spec


def _build_matching(transformers, config, shapes: Mapping[str, Sequence[int]]):
    """The model (built on the CPU) of _matching_class and its name map."""
    cls, _, rename = _matching_class(transformers, config, shapes)
    model = cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)
    return model, rename


def _matching_class(transformers, config, shapes: Mapping[str, Sequence[int]]):
    """The model class (from config.architectures, then the Auto classes) whose parameter names
    cover the checkpoint's best, its {name: shape}, and the map from its names to the checkpoint's
    (a base-model prefix such as 'bert.' or 'model.' added or removed).

    The candidates are built on the meta device (no memory): a config.json whose sizes do not match
    the checkpoint's tensors (a hostile hidden_size of 10^7, a config from another model) is refused
    before a real model is built, so the one that is built is no larger than the checkpoint."""
    candidates = [getattr(transformers, a) for a in (config.architectures or []) if hasattr(transformers, a)]
    candidates += [transformers.AutoModelForCausalLM, transformers.AutoModel]
    best = None
    for cls in candidates:
        try:
            with torch.device("meta"):
                model = cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)
        except Exception:  # noqa: BLE001 - a class this config cannot build (any error type): not a candidate
            continue
        own = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        prefix = getattr(model, "base_model_prefix", "") or ""
        for rename in (lambda n: n, lambda n, p=prefix: n[len(p) + 1:] if p and n.startswith(p + ".") else n,
                       lambda n, p=prefix: f"{p}.{n}" if p else n):
            score = sum(rename(n) in shapes for n in own)
            if best is None or score > best[0]:
                best = (score, cls, own, rename)
    if best is None or best[0] == 0:
        raise CheckpointError(f"config.json names {config.architectures}, but no model built from it has the "
                              "checkpoint's tensor names; give the spec as YAML (spec_file=FILE)")
    _, cls, own, rename = best
    wrong = next((n for n in own if rename(n) in shapes and tuple(shapes[rename(n)]) != own[n]), None)
    if wrong is not None:
        raise CheckpointError(f"config.json does not describe this checkpoint: its model has {wrong!r} of shape "
                              f"{list(own[wrong])}, the file {list(shapes[rename(wrong)])}; use the config the "
                              "checkpoint was saved with, or give the spec as YAML (spec_file=FILE)")
    return cls, own, rename
