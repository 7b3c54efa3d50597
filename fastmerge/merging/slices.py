"""Merged layer slices (mergekit's `slices:` with a merge method other than passthrough): each
output slice merges the same-length layer ranges of its sources layer by layer, and the slices
follow one another (so the layer count may change, as with passthrough).

As mergekit assembles them: output layer j of a slice is the merge of layer start_k + j of every
source k, its position for gradients t = j / (n - 1) over the slice's n layers (1 when n = 1); the
tensors before the layers (embeddings) merge the first slice's sources, the ones after them (the
final norm, the output head) the last slice's, both at t = 0. A tensor's filters match its output
name. Streamed tensor by tensor into safetensors; a folder output gets the base's (else the first
source's) config with the new layer count.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..errors import CheckpointError, InvalidArgumentError, NonFiniteError
from ..io import Checkpoint, merge_metadata, parse_dtype, parse_size
from ..io.hf_folder import model_card, source_folder, write_folder_files
from ..io.writer import ShardedWriter
from .checkpoints import check_inputs_finite, check_output_finite, loaded_inputs
from .passthrough import _BEFORE_LAYERS, _layer, config_with_layers
from .same_init import SameInitOptions, merge_tensor
from .vocabulary import (VocabularyPlan, model_folder, output_config, output_template, plan_vocabulary,
                         tokenizer_folder)


@dataclass(frozen=True)
class MergedSlice:
    """Layers ranges[k] = (start, end) of models[k], merged; the base (when the method has one)
    with its own range; `options(name, t)`: the method's options for output tensor `name` at
    position t."""

    models: tuple[str, ...]
    ranges: tuple[tuple[int, int], ...]
    options: Callable[[str, float], SameInitOptions]
    base: str | None = None
    base_range: tuple[int, int] | None = None


@dataclass(frozen=True)
class _Planned:
    out: str
    inputs: tuple[tuple[Checkpoint, str], ...]
    base: tuple[Checkpoint, str] | None
    options: SameInitOptions
    vocabulary: VocabularyPlan | None = None  # re-indexes this tensor's rows (a tokenizer_source)


def _layers(ckpt: Checkpoint) -> dict[int, list[tuple[str, int, str]]]:
    layers: dict[int, list] = {}
    for name in ckpt.keys():
        parts = _layer(name)
        if parts is not None:
            layers.setdefault(parts[1], []).append(parts)
    if sorted(layers) != list(range(len(layers))):
        raise CheckpointError(f"{ckpt.path}: its layers are not numbered 0 to n-1 (found {sorted(layers)[:8]}); "
                              "slices need a transformer's layer stack")
    return layers


def _vocabularies(slices: Sequence[MergedSlice], tokenizer: Mapping, opened) -> dict[int, VocabularyPlan]:
    """The vocabulary plans of the first and last slices' inputs (the tensors outside the layers
    come from them), all for one output tokenizer: mergekit builds it from every model of the
    config (its base: the first slice's base, else its first model)."""
    everything = list(dict.fromkeys(model_folder(p) for s in slices for p in (*([s.base] if s.base else []), *s.models)))
    # one output tokenizer for every plan (a union is built once)
    source = tokenizer_folder(tokenizer["source"], everything, model_folder(slices[0].base or slices[0].models[0]))
    plans = {}
    for s in {id(slices[0]): slices[0], id(slices[-1]): slices[-1]}.values():
        paths = [*s.models, *([s.base] if s.base else [])]
        plans[id(s)] = plan_vocabulary([model_folder(p) for p in paths],
                                       [{k: tuple(opened(p).shape(k)) for k in opened(p).keys()} for p in paths],
                                       source, base_index=len(s.models) if s.base else None,
                                       pad_to_multiple_of=tokenizer.get("pad_to_multiple_of"),
                                       tokens=tokenizer.get("tokens"))
    return plans


def plan_slices(slices: Sequence[MergedSlice],
                tokenizer: Mapping | None = None) -> tuple[list[_Planned], list[int], VocabularyPlan | None]:
    """(every output tensor with its inputs, the input layer of each output layer, the vocabulary plan of a
    `tokenizer` ({"source", "pad_to_multiple_of", "tokens"}: fastmerge.merging.vocabulary) or None);
    checks the ranges and shapes."""
    if not slices:
        raise InvalidArgumentError("slices: at least one slice is needed")
    opened: dict[str, Checkpoint] = {}

    def ckpt(path: str) -> Checkpoint:
        if path not in opened:
            opened[path] = Checkpoint(path)
        return opened[path]

    counts = {}
    for s in slices:
        for path, (start, end) in zip((*s.models, *([s.base] if s.base else [])),
                                      (*s.ranges, *([s.base_range] if s.base else []))):
            counts.setdefault(path, len(_layers(ckpt(path))))
            if not 0 <= start < end <= counts[path]:
                raise InvalidArgumentError(f"{path}: layer_range [{start}, {end}] is not within its {counts[path]} layers")

    vocabularies = _vocabularies(slices, tokenizer, ckpt) if tokenizer is not None else {}

    def entry(s: MergedSlice, out: str, names: Sequence[str], base_name: str | None, t: float) -> _Planned:
        inputs = tuple((ckpt(m), n) for m, n in zip(s.models, names))
        base = (ckpt(s.base), base_name) if s.base else None
        vocabulary = vocabularies.get(id(s))
        vocabulary = vocabulary if vocabulary is not None and out in vocabulary.names else None
        cut = 1 if vocabulary is not None else 0  # a vocabulary tensor's rows differ between inputs
        shapes = {tuple(c.shape(n))[cut:] if n in c else None for c, n in (*inputs, *([base] if base else []))}
        if None in shapes:
            missing = next(c.path for c, n in (*inputs, *([base] if base else [])) if n not in c)
            raise CheckpointError(f"{missing}: has no tensor for output {out!r}; a slice merges models of one architecture")
        if len(shapes) > 1:
            raise CheckpointError(f"output tensor {out!r}: its sources differ in shape {sorted(shapes)}; merge models "
                                  "of one architecture")
        return _Planned(out, inputs, base, s.options(out, t), vocabulary)

    plan = []
    first, last = slices[0], slices[-1]
    outside_first = [n for n in ckpt(first.models[0]).keys() if _layer(n) is None]
    for name in outside_first:
        if _BEFORE_LAYERS.search(name):
            plan.append(entry(first, name, [name] * len(first.models), name, 0.0))
    order = []  # the (first source's) input layer of each output layer
    for s in slices:
        n = s.ranges[0][1] - s.ranges[0][0]
        layers = _layers(ckpt(s.models[0]))
        for j in range(n):
            t = j / (n - 1) if n > 1 else 1.0
            for prefix, _, rest in layers[s.ranges[0][0] + j]:
                names = [f"{prefix}{start + j}{rest}" for start, _ in s.ranges]
                base_name = f"{prefix}{s.base_range[0] + j}{rest}" if s.base else None
                plan.append(entry(s, f"{prefix}{len(order)}{rest}", names, base_name, t))
            order.append(s.ranges[0][0] + j)
    for name in [n for n in ckpt(last.models[0]).keys() if _layer(n) is None and not _BEFORE_LAYERS.search(n)]:
        plan.append(entry(last, name, [name] * len(last.models), name, 0.0))
    return plan, order, vocabularies.get(id(first))


def describe_slices(slices: Sequence[MergedSlice], tokenizer: Mapping | None = None) -> str:
    """What merge_slices would do (--dry-run): each slice's sources, the layer count, the tensors."""
    plan, order, vocabulary = plan_slices(slices, tokenizer)
    lines = [f"method: {plan[0].options.method if plan else '-'}"]
    for i, s in enumerate(slices):
        sources = ", ".join(f"{m} [{a}, {b})" for m, (a, b) in zip(s.models, s.ranges))
        lines.append(f"slice {i}: {sources}" + (f"; base {s.base} {list(s.base_range)}" if s.base else ""))
    lines.append(f"layers: {len(order)}; tensors: {len(plan)}")
    if vocabulary is not None:
        lines.append(f"tokenizer: {vocabulary.folder} ({vocabulary.size} vocabulary rows)")
    return "\n".join(lines)


def merge_slices(slices: Sequence[MergedSlice], output: str, *, dtype: str | None = None,
                 max_shard_size: str | int | None = "5GB", overwrite: bool = False, copy_tokenizer: bool = True,
                 write_card: bool = True, allow_nonfinite: bool = False, progress: bool = True,
                 tokenizer: Mapping | None = None, chat_template: str | None = None,
                 input_dtype: str | None = None) -> list[str]:
    """Writes the merged slices to `output` (module docstring); returns the files written. NaN/Inf
    in an input or a merged tensor is refused before anything is renamed into place. `tokenizer`,
    `chat_template` and `input_dtype` as for fastmerge.merging.checkpoints.merge_checkpoints."""
    out_dtype = parse_dtype(dtype)
    loaded_dtype = parse_dtype(input_dtype)
    plan, order, vocabulary = plan_slices(slices, tokenizer)

    def target(p: _Planned) -> torch.dtype:
        c, n = p.inputs[0]
        own = c.dtype(n)
        return out_dtype if out_dtype is not None and own.is_floating_point else own

    def shape(p: _Planned) -> tuple[int, ...]:
        own = tuple(p.inputs[0][0].shape(p.inputs[0][1]))
        return (p.vocabulary.size, *own[1:]) if p.vocabulary is not None else own

    layout = [(p.out, shape(p), target(p)) for p in plan]
    every = {c.path: c for p in plan for c, _ in (*p.inputs, *([p.base] if p.base else []))}
    method = plan[0].options.method if plan else "linear"
    metadata = merge_metadata(method, "none", sorted(every))
    writer = ShardedWriter(output, layout, max_shard_bytes=parse_size(max_shard_size), metadata=metadata,
                           overwrite=overwrite, protected=[f for c in every.values() for f in c.files()])
    source = None if writer.single_file else source_folder(slices[0].base or slices[0].models[0])
    if source is None and vocabulary is not None:
        raise CheckpointError(f"{output}: tokenizer_source writes a model folder; give a folder as the output, not a "
                              ".safetensors file")
    inputs = [] if chat_template is None else list(dict.fromkeys(
        f for s in slices for f in (source_folder(p) for p in (*([s.base] if s.base else []), *s.models)) if f))
    template = output_template(chat_template, inputs, output=output, source=source,
                               tokenizer_folder=vocabulary.folder if vocabulary else None, copy_tokenizer=copy_tokenizer)
    config = None
    if source is not None:
        config = config_with_layers(source, order, "the slices'")
        if vocabulary is not None:
            config = output_config(config, vocabulary)
    with writer:
        for p in tqdm(plan, desc=f"merge slices ({method})", unit="tensor", disable=not progress):
            tensors = [c.read(n) for c, n in p.inputs]
            base = p.base[0].read(p.base[1]) if p.base else None
            if p.vocabulary is not None:  # rows re-indexed to the output's tokenizer
                remapped = p.vocabulary.remap(tensors + ([base] if base is not None else []))
                tensors, base = remapped[: len(p.inputs)], (remapped[-1] if base is not None else None)
            labels = [c.path for c, _ in p.inputs] + ([p.base[0].path] if p.base else [])
            if not allow_nonfinite:
                check_inputs_finite(p.out, tensors + ([base] if base is not None else []), labels)
            dtype_out = target(p)
            stored = tensors[0].dtype
            loaded = loaded_inputs(p.out, tensors + [base], labels + ([] if p.base else [""]), loaded_dtype,
                                   check=not allow_nonfinite)
            tensors, base = loaded[: len(tensors)], loaded[-1]
            try:
                merged = merge_tensor(p.out, tensors, base, p.options, dtype_out)
            except NonFiniteError:
                check_inputs_finite(p.out, tensors + ([base] if base is not None else []), labels)
                raise
            if dtype_out.is_floating_point and not allow_nonfinite:
                narrowing = torch.finfo(dtype_out).max < torch.finfo(stored).max
                check_output_finite(p.out, merged, dtype_out, narrowing=narrowing)
            writer.write(p.out, merged.contiguous())
    files = list(writer.final_paths)
    if source is not None:
        ranges = [[(os.path.basename(os.path.abspath(m)), *r) for m, r in zip(s.models, s.ranges)] for s in slices]
        card = model_card(sorted(every), method, {"slices": ranges}, slices[0].base) if write_card else None
        files += write_folder_files(writer.folder, source, config, dtype=out_dtype, card=card,
                                    copy_tokenizer=copy_tokenizer,
                                    tokenizer_folder=vocabulary.folder if vocabulary else None,
                                    chat_template=template)
    return files
