"""Passthrough of layer slices (mergekit's `slices:` with `merge_method: passthrough`): the output's
layers are the listed layer ranges of the listed models, one after the other ("frankenmerges"
that change the layer count), each tensor copied (times its `scale`, when one is given), streamed
into safetensors; the folder output's config.json gets the new layer count.

As mergekit assembles them: the tensors outside the layers come from the first slice's model
when they precede the layers (embeddings) and from the last slice's model otherwise (the final
norm, the output head); a layer's position t for gradients is its index within its slice over the
slice's length - 1; tensors outside the layers have t = 0.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..errors import CheckpointError, InvalidArgumentError
from ..io import Checkpoint, merge_metadata, parse_dtype, parse_size
from ..io.hf_folder import model_card, read_config, source_folder, write_folder_files
from ..io.writer import ShardedWriter
from .checkpoints import check_inputs_finite, check_output_finite, loaded_inputs
from .gradients import LAYER_NAME, Setting, first
from .vocabulary import model_folder, output_config, output_template, plan_vocabulary, tokenizer_folder

# tensors outside the layers that come before them (taken from the first slice's model)
_BEFORE_LAYERS = re.compile(r"embed|wte|wpe|word_embeddings|position_embeddings|token_type")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass(frozen=True)
class Slice:
    """Layers [start, end) of `model` (end None: to its last layer), scaled by `scale` (None: copied
    as they are)."""

    model: str
    start: int
    end: int | None
    scale: Setting | None = None


def _layer(name: str) -> tuple[str, int, str] | None:
    match = LAYER_NAME.match(name)
    return (match.group(1), int(match.group(2)), match.group(3)) if match else None


def config_with_layers(source: str, order: Sequence[int], whose: str) -> dict:
    """Folder `source`'s config.json for a slices output whose layer j is an input's layer
    `order[j]`: its layer count set to len(order), and its per-layer lists (`layer_types`: full or
    sliding attention, ...: any list under a key naming layers, one entry per layer) rebuilt in
    that order, so transformers' check that they match the count passes and each layer keeps its
    kind."""
    config = read_config(source)
    key = next((k for k in LAYER_COUNT_KEYS if k in config), None)
    if key is None:
        raise CheckpointError(f"{source}/config.json: no layer count ({', '.join(LAYER_COUNT_KEYS)}) to set to "
                              f"{whose} {len(order)} layers")
    count = config[key]
    per_layer = {k: [v[i] for i in order] for k, v in config.items()
                 if "layer" in k and isinstance(v, list) and len(v) == count and count > 0}
    other = [k for k, v in config.items() if "layer" in k and isinstance(v, list) and v and k not in per_layer]
    if other:  # lists of layer indices (Qwen-MoE's mlp_only_layers, ...): nothing says how to renumber them
        warnings.warn(f"{source}/config.json: {', '.join(other)} name layers by index and are copied as they were; "
                      f"check them against the output's {len(order)} layers", stacklevel=3)
    return {**config, key: len(order), **per_layer}


def plan_passthrough(slices: Sequence[Slice], base: str | None = None, tokenizer: Mapping | None = None):
    """The output's tensors in order, as (output name, checkpoint, input name, slice, t), the
    input layer of each output layer and {id(checkpoint): VocabularyPlan} for a `tokenizer`; checks every
    slice's layer range."""
    if not slices:
        raise InvalidArgumentError("passthrough needs at least one slice")
    models = {s.model: Checkpoint(s.model) for s in slices}
    plan = []  # (output name, checkpoint, input name, scale setting, t)
    first_model, last_model = models[slices[0].model], models[slices[-1].model]
    outside = [n for n in first_model.keys() if _layer(n) is None]
    for name in outside:
        if _BEFORE_LAYERS.search(name):
            plan.append((name, first_model, name, slices[0], 0.0))
    order = []  # the input layer of each output layer
    for s in slices:
        ckpt = models[s.model]
        layers = {}
        for name in ckpt.keys():
            parts = _layer(name)
            if parts is not None:
                layers.setdefault(parts[1], []).append(parts)
        end = len(layers) if s.end is None else s.end
        if sorted(layers) != list(range(len(layers))):
            raise CheckpointError(f"{s.model}: its layers are not numbered 0 to n-1 (found {sorted(layers)[:8]}); "
                                  "passthrough needs a transformer's layer stack")
        if not 0 <= s.start < end <= len(layers):
            raise InvalidArgumentError(f"{s.model}: layer_range [{s.start}, {end}] is not within its "
                                       f"{len(layers)} layers")
        for i in range(s.start, end):
            t = (i - s.start) / (end - s.start - 1) if end - s.start > 1 else 1.0
            for prefix, _, rest in layers[i]:
                plan.append((f"{prefix}{len(order)}{rest}", ckpt, f"{prefix}{i}{rest}", s, t))
            order.append(i)
    for name in [n for n in last_model.keys() if _layer(n) is None and not _BEFORE_LAYERS.search(n)]:
        plan.append((name, last_model, name, slices[-1], 0.0))
    vocabularies = _vocabularies(slices, models, base, tokenizer) if tokenizer is not None else {}
    return plan, order, vocabularies


def describe_passthrough(slices: Sequence[Slice], base: str | None = None, tokenizer: Mapping | None = None) -> str:
    """What passthrough would write (--dry-run): each slice's layers, the layer count, the tensors."""
    plan, order, vocabularies = plan_passthrough(slices, base, tokenizer)
    lines = ["method: passthrough"]
    for i, s in enumerate(slices):
        end = "end" if s.end is None else s.end
        lines.append(f"slice {i}: {s.model} [{s.start}, {end})" + (" (scaled)" if s.scale is not None else ""))
    lines.append(f"layers: {len(order)}; tensors: {len(plan)}; "
                 f"{sum(c.tensor_bytes(n) for _, c, n, _, _ in plan) / 1e9:.2f} GB as stored")
    vocabulary = next(iter(vocabularies.values()), None)
    if vocabulary is not None:
        lines.append(f"tokenizer: {vocabulary.folder} ({vocabulary.size} vocabulary rows)")
    return "\n".join(lines)


def passthrough(slices: Sequence[Slice], output: str, *, base: str | None = None, dtype: str | None = None,
                max_shard_size: str | int | None = "5GB", overwrite: bool = False, shared_scale: Setting | None = None,
                copy_tokenizer: bool = True, write_card: bool = True, allow_nonfinite: bool = False,
                progress: bool = True, tokenizer: Mapping | None = None, chat_template: str | None = None,
                input_dtype: str | None = None) -> list[str]:
    """Writes the layers of `slices`, in order, with the tensors around them, to `output`; returns
    the files written. A folder output gets the config of `base` (else the first slice's model)
    with the new layer count. NaN/Inf, in an input or after a scale, is refused before anything is
    renamed into place, as in every merge (allow_nonfinite: written). `tokenizer` and
    `chat_template` as for merge_checkpoints: the embeddings (first slice's model) and the LM head
    (last slice's) re-indexed to the output tokenizer's vocabulary. `input_dtype` (mergekit's
    `dtype`): each tensor converted to it as it is read, before it is scaled."""
    out_dtype = parse_dtype(dtype)
    loaded_dtype = parse_dtype(input_dtype)
    plan, order, vocabularies = plan_passthrough(slices, base, tokenizer)
    models = {id(c): c for _, c, _, _, _ in plan}

    def target(ckpt: Checkpoint, name: str) -> torch.dtype:
        own = ckpt.dtype(name)
        return out_dtype if out_dtype is not None and own.is_floating_point else own

    def shape(ckpt: Checkpoint, name: str) -> tuple[int, ...]:
        vocabulary = vocabularies.get(id(ckpt))
        own = tuple(ckpt.shape(name))
        return (vocabulary.size, *own[1:]) if vocabulary is not None and name in vocabulary.names else own

    layout = [(out, shape(ckpt, name), target(ckpt, name)) for out, ckpt, name, _, _ in plan]
    metadata = merge_metadata("passthrough", "none", [s.model for s in slices])
    writer = ShardedWriter(output, layout, max_shard_bytes=parse_size(max_shard_size), metadata=metadata,
                           overwrite=overwrite, protected=[f for c in models.values() for f in c.files()])
    source = None if writer.single_file else source_folder(base or slices[0].model)
    if source is None and tokenizer is not None:
        raise CheckpointError(f"{output}: tokenizer_source writes a model folder; give a folder as the output, not a "
                              ".safetensors file")
    config = None if source is None else config_with_layers(source, order, "the passthrough's")
    vocabulary = next(iter(vocabularies.values()), None)
    if config is not None and vocabulary is not None:
        config = output_config(config, vocabulary)
    inputs = [] if chat_template is None else list(dict.fromkeys(
        f for f in (source_folder(p) for p in ([base] if base else []) + [s.model for s in slices]) if f))
    template = output_template(chat_template, inputs, output=output, source=source,
                               tokenizer_folder=vocabulary.folder if vocabulary else None, copy_tokenizer=copy_tokenizer)
    # A tensor is written by a thread while the next one is read and checked (the write waits for
    # the disk); one write in flight. The pool exits first: on an error the write in flight ends
    # before the writer removes its temporary files.
    with writer, ThreadPoolExecutor(1, thread_name_prefix="fastmerge-write") as pool:
        pending = None
        for out, ckpt, name, s, t in tqdm(plan, desc="passthrough", unit="tensor", disable=not progress):
            tensor = ckpt.read(name)
            remapped = id(ckpt) in vocabularies and name in vocabularies[id(ckpt)].names
            if remapped:  # rows of the output's tokenizer
                tensor = vocabularies[id(ckpt)].remap([tensor])[0]
            dtype = target(ckpt, name)
            if tensor.is_floating_point() and not allow_nonfinite:
                check_inputs_finite(name, [tensor], [s.model])
            scale = first((s.scale, shared_scale), name, t)
            loaded = loaded_inputs(name, [tensor], [s.model], loaded_dtype, check=not allow_nonfinite)[0]
            changed = remapped or scale is not None or dtype != tensor.dtype or loaded.dtype != tensor.dtype
            tensor = loaded
            if scale is not None and tensor.is_floating_point():
                tensor = tensor * scale
            tensor = tensor.to(dtype).contiguous()
            if changed and tensor.is_floating_point() and not allow_nonfinite:  # a copy: its input was checked
                narrowing = torch.finfo(dtype).max < torch.finfo(ckpt.dtype(name)).max
                check_output_finite(out, tensor, dtype, narrowing=narrowing)
            if pending is not None:
                pending.result()
            pending = pool.submit(writer.write, out, tensor)
        if pending is not None:
            pending.result()
    files = list(writer.final_paths)
    if source is not None:
        card = model_card([s.model for s in slices], "passthrough",
                          {"slices": [(os.path.basename(os.path.abspath(s.model)), s.start, s.end) for s in slices]},
                          base) if write_card else None
        files += write_folder_files(writer.folder, source, config, dtype=out_dtype, card=card,
                                    copy_tokenizer=copy_tokenizer,
                                    tokenizer_folder=vocabulary.folder if vocabulary else None,
                                    chat_template=template)
    return files


def _vocabularies(slices: Sequence[Slice], models: dict, base: str | None, tokenizer: Mapping) -> dict:
    """{id(checkpoint): VocabularyPlan} for the first and last slices' models (their embeddings and
    LM head are the output's), one output tokenizer built from every model of the config."""
    everything = list(dict.fromkeys(model_folder(p) for p in ([base] if base else []) + [s.model for s in slices]))
    source = tokenizer_folder(tokenizer["source"], everything, model_folder(base or slices[0].model))
    plans = {}
    for path in dict.fromkeys((slices[0].model, slices[-1].model)):
        ckpt = models[path]
        plans[id(ckpt)] = plan_vocabulary([model_folder(path)], [{k: tuple(ckpt.shape(k)) for k in ckpt.keys()}], source,
                                          base_index=None, pad_to_multiple_of=tokenizer.get("pad_to_multiple_of"),
                                          tokens=tokenizer.get("tokens"))
    return plans
