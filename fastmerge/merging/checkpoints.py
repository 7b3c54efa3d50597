"""Same-initialisation merges of checkpoint files, streamed tensor by tensor.

Inputs are opened lazily (memory-mapped safetensors, weights-only torch files), checked against
each other before any work (names, shapes, dtypes, with a diff of what differs), and the output
is written as the tensors are computed (fastmerge.io.ShardedWriter): memory holds a few tensors,
not models, in buffers reused from tensor to tensor.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from ..alignment.weight_matching import weight_matching
from ..checks import layout_difference
from ..errors import CheckpointError, NonFiniteError, ShapeMismatchError
from ..io import Checkpoint, merge_metadata, parse_dtype, plan_output, tensor_nbytes
from ..io.hf_folder import CONFIG_NAME, copied_files, model_card, read_config, source_folder, write_folder_files
from ..ops import count_nonfinite
from ..spec import spec_from_yaml
from ..spec.hf_config import config_folder, spec_from_config
from ..spec.folding import fold_state, folded_spec
from ..spec.transforms import apply_permutations
from ..stages import stage
from .same_init import SameInitOptions, as_loaded, checks_finite, merge_tensor
from .vocabulary import output_config, output_template, plan_vocabulary


@dataclass
class MergePlan:
    """What a checkpoint merge will do (printed by --dry-run)."""

    inputs: list[str]
    base: str | None
    output: str
    options: SameInitOptions
    tensors: int
    input_bytes: int
    output_files: list[str]
    out_dtype: str | None
    option_sets: int = 0  # distinct per-tensor option sets (a config's gradients or filters), 0: none
    # write_folder_files' tokenizer_folder (a tokenizer_source) and chat_template (its text)
    folder_options: dict = field(default_factory=dict)

    def describe(self) -> str:
        lines = [f"method: {self.options.method} ({', '.join(f'{k}={v}' for k, v in asdict(self.options).items() if k != 'method')})"]
        if self.option_sets:
            lines.append(f"options vary by tensor (gradients or filters): {self.option_sets} sets, the first shown")
        lines += [f"model {i}: {p}" for i, p in enumerate(self.inputs)]
        if self.base:
            lines.append(f"base: {self.base}")
        lines.append(f"tensors: {self.tensors} ({self.input_bytes / 1e9:.2f} GB per model)")
        lines.append(f"dtype: {self.out_dtype or 'as the inputs'}")
        if self.folder_options.get("tokenizer_folder"):
            lines.append(f"tokenizer: {self.folder_options['tokenizer_folder']} (embeddings re-indexed to its vocabulary)")
        if self.folder_options.get("chat_template"):
            lines.append("chat template: set (tokenizer_config.json)")
        lines += [f"writes: {p}" for p in self.output_files]
        return "\n".join(lines)


def check_compatible(checkpoints: Sequence[Checkpoint], labels: Sequence[str], *, cast: bool = False,
                     vocabulary: frozenset[str] = frozenset()) -> None:
    """Same tensor names and shapes in every checkpoint, and the same dtypes unless the output is
    cast to one (`cast`: merge_tensor then combines mixed precisions in float32); the error lists
    what differs. The rows of `vocabulary` tensors may differ (re-indexed by a tokenizer_source)."""
    def layout(ckpt):
        return {k: (None,) + tuple(ckpt.shape(k))[1:] if k in vocabulary else tuple(ckpt.shape(k)) for k in ckpt.keys()}

    ref = layout(checkpoints[0])
    for ckpt, label in zip(checkpoints[1:], labels[1:]):
        other = layout(ckpt)
        missing, extra, differ = layout_difference(ref, other)
        if missing or extra:
            raise ShapeMismatchError(
                f"{label} does not have the tensors of {labels[0]}: missing {len(missing)} {missing[:3]}, "
                f"extra {len(extra)} {extra[:3]}; merge checkpoints of one architecture")
        if differ:
            name = differ[0]
            raise ShapeMismatchError(f"{label}: {len(differ)} tensor(s) differ in shape from {labels[0]}, e.g. {name!r} "
                                     f"{other[name]} vs {ref[name]}; models with different widths cannot be merged "
                                     "entry by entry")
        if not cast:
            mixed = next((k for k in checkpoints[0].keys() if ckpt.dtype(k) != checkpoints[0].dtype(k)), None)
            if mixed is not None:
                name = str(checkpoints[0].dtype(mixed)).removeprefix("torch.")
                raise ShapeMismatchError(f"{label}: tensor {mixed!r} is {ckpt.dtype(mixed)}, in {labels[0]} "
                                         f"{checkpoints[0].dtype(mixed)}; to merge them anyway, cast the output to "
                                         f"one dtype: dtype={name}")


def plan_merge(models: Sequence[str], output: str, options: SameInitOptions, *, base: str | None = None,
               dtype: str | None = None, max_shard_size: str | int | None = "5GB", overwrite: bool = False,
               align: str | None = None, spec_file: str | None = None, copy_tokenizer: bool = True,
               write_card: bool = True, tensor_options: Mapping[str, SameInitOptions] | None = None,
               tokenizer: Mapping | None = None, chat_template: str | None = None, input_dtype: str | None = None):
    """Opens and checks every input and plans the output; returns (plan, checkpoints, base, writer,
    (the folder whose config and tokenizer a folder output gets, its config) or None, the
    VocabularyPlan of a `tokenizer` ({"source": "base" or a folder, "pad_to_multiple_of": n}) or
    None)."""
    out_dtype = parse_dtype(dtype)
    checkpoints = [Checkpoint(p) for p in models]
    base_ckpt = Checkpoint(base) if base else None
    for each in {options, *(tensor_options or {}).values()}:  # per-tensor options (gradients, filters) too
        each.validate(len(checkpoints), base_ckpt is not None)
    every = checkpoints + ([base_ckpt] if base_ckpt else [])
    labels = list(models) + ([base] if base else [])
    vocabulary = None
    if tokenizer is not None or chat_template is not None:
        folders = [source_folder(p) for p in labels]
        if None in folders:
            key = "tokenizer_source" if tokenizer is not None else "chat_template"
            raise CheckpointError(f"{labels[folders.index(None)]}: {key} needs Hugging Face model folders "
                                  "(config.json and tokenizer next to the weights)")
    if tokenizer is not None:
        if align:
            raise CheckpointError("tokenizer_source with weight matching is not supported; merge without --align")
        vocabulary = plan_vocabulary(folders, [{k: tuple(c.shape(k)) for k in c.keys()} for c in every],
                                     tokenizer["source"], base_index=len(models) if base else None,
                                     pad_to_multiple_of=tokenizer.get("pad_to_multiple_of"), tokens=tokenizer.get("tokens"))
    parse_dtype(input_dtype)  # an unknown name fails here, before anything is read
    check_compatible(every, labels, cast=dtype is not None or input_dtype is not None,
                     vocabulary=vocabulary.names if vocabulary else frozenset())
    if align not in (None, "weight_matching"):
        raise CheckpointError(f"unknown alignment {align!r} for checkpoint files; use weight_matching (with spec_file=FILE.yaml)")
    if align and not spec_file:
        raise CheckpointError("weight matching of checkpoint files needs the model's merge spec: spec_file=FILE.yaml "
                              "(fastmerge.spec.save_spec(trace_spec(model, inputs), ...)) or spec_file=auto (from the "
                              "Hugging Face config.json next to the first model)")
    recorded = asdict(options)
    if tensor_options:  # gradients or filters: the options vary by tensor; the first tensor's are shown
        recorded["per_tensor"] = f"{len(set(tensor_options.values()))} option sets; these are the first tensor's"
    metadata = merge_metadata(options.method, align or "none", models, options=recorded)
    if vocabulary is not None:
        metadata["tokenizer_source"] = tokenizer["source"]
    shapes = {n: (vocabulary.size, *checkpoints[0].shape(n)[1:]) for n in vocabulary.names} if vocabulary else None
    writer = plan_output(checkpoints[0], output, out_dtype=out_dtype, metadata=metadata,
                         max_shard_size=max_shard_size, overwrite=overwrite, protected=every, shapes=shapes)
    source = None if writer.single_file else source_folder(base or models[0])  # mergekit: the base's
    tokenizer_folder = vocabulary.folder if vocabulary else None
    if source is None and vocabulary is not None:
        raise CheckpointError(f"{output}: tokenizer_source writes a model folder; give a folder as the output, not a "
                              ".safetensors file")
    template = output_template(chat_template, folders if chat_template is not None else [], output=output,
                               source=source, tokenizer_folder=tokenizer_folder, copy_tokenizer=copy_tokenizer)
    folder_options = {"tokenizer_folder": tokenizer_folder, "chat_template": template}
    extras = [] if source is None else [os.path.join(writer.folder, n) for n in (
        CONFIG_NAME, *(["README.md"] if write_card else []),
        *(n for _, n in copied_files(source, copy_tokenizer, **folder_options)))]
    existing = [p for p in extras if os.path.exists(p)]
    if existing and not overwrite:
        raise CheckpointError(f"{existing[0]}: exists already; pass overwrite=True to replace it")
    plan = MergePlan(list(models), base, output, options, len(checkpoints[0]), checkpoints[0].nbytes(),
                     writer.final_paths + extras, dtype, len(set((tensor_options or {}).values())),
                     folder_options=folder_options)
    config = None
    if source is not None:
        config = read_config(source)
        if vocabulary is not None:
            config = output_config(config, vocabulary)
    return plan, checkpoints, base_ckpt, writer, None if source is None else (source, config), vocabulary


def _write_folder_files(plan: MergePlan, writer, source: tuple[str, dict] | None, out_dtype, copy_tokenizer: bool,
                       card: bool) -> None:
    """A folder output becomes a Hugging Face model folder (config, tokenizer, model card)."""
    if source is None:
        return
    parameters = {k: v for k, v in asdict(plan.options).items() if k != "method"}
    if plan.folder_options.get("tokenizer_folder"):
        parameters["tokenizer_source"] = plan.folder_options["tokenizer_folder"]
    write_folder_files(writer.folder, *source, dtype=out_dtype, copy_tokenizer=copy_tokenizer,
                       card=model_card(plan.inputs, plan.options.method, parameters, plan.base) if card else None,
                       **plan.folder_options)


def merge_checkpoints(models: Sequence[str], output: str, options: SameInitOptions | None = None, *,
                      base: str | None = None, dtype: str | None = None, max_shard_size: str | int | None = "5GB",
                      overwrite: bool = False, progress: bool = True, align: str | None = None,
                      spec_file: str | None = None, allow_nonfinite: bool = False, copy_tokenizer: bool = True,
                      write_card: bool = True, tensor_options: Mapping[str, SameInitOptions] | None = None,
                      tokenizer: Mapping | None = None, chat_template: str | None = None,
                      input_dtype: str | None = None) -> MergePlan:
    """Merges checkpoint files into `output` (a .safetensors file or a folder for shards).

    With ``align="weight_matching"`` and `spec_file` (a YAML merge spec of the architecture, or "auto":
    inferred from the Hugging Face config.json next to the first model) the models
    (and the base, if any) are first permuted onto the first model by weight matching, from the
    files alone ("align then merge", for models trained from different initialisations). That step
    holds every model in memory; the plain merges stream.

    `tensor_options` gives tensors options of their own (the same method; mergekit's gradients and
    filters resolved per tensor); the others get `options`.

    `input_dtype` (mergekit's `dtype`): every floating input converted to it as it is read, before
    any arithmetic (the output is in `dtype`, default the inputs').

    `tokenizer` ({"source": "base" or a model folder, "pad_to_multiple_of": n}): mergekit's
    tokenizer_source, the inputs' embeddings and LM heads re-indexed to that tokenizer's vocabulary
    (fastmerge.merging.vocabulary); `chat_template`: Jinja text or "auto", stored in the output's
    tokenizer_config.json.

    NaN/Inf in an input tensor, or in a merged one (an overflowing sum, a narrowing cast), is refused
    before anything is renamed into place; ``allow_nonfinite=True`` merges and writes them (a model
    that stores -inf masks on purpose). Weight matching refuses them either way: a NaN poisons its
    costs.

    Raises:
        CheckpointError: unreadable/unsafe input, output exists (without overwrite) or is an input.
        ShapeMismatchError: the checkpoints do not hold the same tensors.
        InvalidArgumentError: options that do not fit the method.
    """
    options = options or SameInitOptions()
    plan, checkpoints, base_ckpt, writer, source, vocabulary = plan_merge(
        models, output, options, base=base, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite,
        align=align, spec_file=spec_file, copy_tokenizer=copy_tokenizer, write_card=write_card,
        tensor_options=tensor_options, tokenizer=tokenizer, chat_template=chat_template, input_dtype=input_dtype)
    loaded_dtype = parse_dtype(input_dtype)
    inputs = checkpoints + ([base_ckpt] if base_ckpt else [])  # the base, if any, last
    labels = list(models) + ([base] if base_ckpt else [])
    sources = _aligned_sources(inputs, spec_file, progress) if align else [c.read for c in inputs]

    # Inputs are maps of the files (no copy); one reused buffer per input for tensors whose bytes
    # are not aligned in the file, and two for the output, as large as the largest tensor: fresh
    # memory for every tensor would cost a page fault per 4 KiB, more than the arithmetic.
    largest = max((checkpoints[0].tensor_bytes(name) for name, _, _ in writer.plan), default=0)
    largest_out = max((tensor_nbytes(shape, dt) for _, shape, dt in writer.plan), default=0)
    read_buffers = [torch.empty(largest, dtype=torch.uint8) for _ in inputs]
    out_buffers = [torch.empty(largest_out, dtype=torch.uint8) for _ in range(2)]

    # A tensor merged into an output buffer is written by a thread while the next one is merged
    # (writing to the page cache is a copy that takes as long as a merge); one write in flight, so
    # a buffer is free again when the write of the tensor after it starts. The pool exits first:
    # on an error the write in flight ends before the writer removes its temporary files.
    with stage("merge"), writer, ThreadPoolExecutor(1, thread_name_prefix="fastmerge-write") as pool:
        pending = None
        bar = tqdm(total=len(writer.plan), desc=f"merge ({options.method})", unit="tensor", disable=not progress)
        for i, (name, shape, out_dtype) in enumerate(writer.plan):
            tensors = [read(name, buf) for read, buf in zip(sources[: len(checkpoints)], read_buffers)]
            base_tensor = sources[-1](name, read_buffers[-1]) if base_ckpt else None
            every = tensors + ([base_tensor] if base_ckpt else [])
            if vocabulary is not None and name in vocabulary.names:  # rows re-indexed to the output's tokenizer
                every = vocabulary.remap(every)
                tensors, base_tensor = every[: len(checkpoints)], (every[-1] if base_ckpt else None)
            own = tensor_options.get(name, options) if tensor_options else options
            if not (align or allow_nonfinite or checks_finite(own)):  # aligned: checked before matching
                check_inputs_finite(name, every, labels)
            stored = tensors[0].dtype
            if loaded_dtype is not None:
                every = loaded_inputs(name, every, labels, loaded_dtype, check=not allow_nonfinite)
                tensors, base_tensor = every[: len(checkpoints)], (every[-1] if base_ckpt else None)
            out_buffer = out_buffers[i % 2]
            out = out_buffer[: tensor_nbytes(shape, out_dtype)].view(out_dtype).reshape(shape) if out_dtype.is_floating_point else None
            try:
                merged = merge_tensor(name, tensors, base_tensor, own, out_dtype, out=out)
            except NonFiniteError:
                check_inputs_finite(name, every, labels)  # names the file (finite inputs: the merge overflowed)
                raise
            if out_dtype.is_floating_point and not allow_nonfinite:  # nothing non-finite is written
                narrowing = torch.finfo(out_dtype).max < torch.finfo(stored).max
                check_output_finite(name, merged, out_dtype, narrowing=narrowing)
            if pending is not None:
                pending.result()
            pending = pool.submit(writer.write, name, merged)
            if merged.numel() and merged.data_ptr() != out_buffer.data_ptr() and _shares_memory(merged, every,
                                                                                                read_buffers):
                # a view of an input (its buffer is reused, its map released, next): written now
                pending.result()
            del tensors, base_tensor, every, merged  # the inputs' maps go before the next ones are made
            bar.update()
        if pending is not None:
            pending.result()
        bar.close()
    _write_folder_files(plan, writer, source, parse_dtype(dtype), copy_tokenizer, write_card)
    return plan


def _shares_memory(merged: torch.Tensor, inputs: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor]) -> bool:
    """Whether `merged` lies in the memory of an input tensor or read buffer (else it is a tensor of
    its own, which its write may hold while the next tensor is merged)."""
    storage = merged.untyped_storage().data_ptr()
    return any(t.untyped_storage().data_ptr() == storage for t in (*inputs, *buffers) if t is not None)


def check_inputs_finite(name: str, tensors: Sequence[torch.Tensor], labels: Sequence[str]) -> None:
    """A NaN or Inf in an input would spread into the merge (or vanish under TIES' trimming):
    refuse, naming the file and tensor. Bit tests at memory speed (fastmerge.ops.count_nonfinite)."""
    counts = count_nonfinite(tensors)
    if bool(counts.any()):
        k = int(counts.nonzero()[0, 0])
        raise NonFiniteError(f"{labels[k]}: tensor {name!r} holds {int(counts[k])} NaN/Inf entries; that checkpoint "
                             "is broken (diverged training, a bad conversion): fix or drop it")


def loaded_inputs(name: str, tensors: Sequence[torch.Tensor | None], labels: Sequence[str],
                  dtype: torch.dtype | None, check: bool) -> list[torch.Tensor | None]:
    """The inputs as a config's `dtype` reads them (as_loaded); with `check` (finite inputs), a value
    past that dtype's range (float16's 65504) is refused, naming the file, instead of becoming Inf."""
    loaded = as_loaded(tensors, dtype)
    if check and dtype is not None and dtype.is_floating_point:
        changed = [(t, label) for t, s, label in zip(loaded, tensors, labels) if t is not None and t is not s]
        counts = count_nonfinite([t for t, _ in changed]) if changed else None
        if counts is not None and bool(counts.any()):
            k = int(counts.nonzero()[0, 0])
            # an input already non-finite (its own check may not have run: TIES counts them later) is
            # named as such, not as a value past the dtype's range
            originals = [s for t, s in zip(loaded, tensors) if t is not None and t is not s]
            check_inputs_finite(name, originals[k:k + 1], [changed[k][1]])
            raise NonFiniteError(f"{changed[k][1]}: tensor {name!r} holds {int(counts[k])} value(s) beyond {dtype}'s range "
                                 f"(|x| > {torch.finfo(dtype).max:g}), which the config's dtype reads as Inf; use "
                                 "dtype: bfloat16 or float32")
    return loaded


def check_output_finite(name: str, merged: torch.Tensor, dtype: torch.dtype, narrowing: bool) -> None:
    """Finite inputs can still merge into NaN/Inf (a sum past the dtype's range, a cast to a narrower
    one): refuse before anything is renamed into place (a bit test at memory speed)."""
    count = int(count_nonfinite([merged])[0])
    if not count:
        return
    if narrowing:
        raise NonFiniteError(f"tensor {name!r}: the merged values overflow {dtype} (|x| > {torch.finfo(dtype).max:g}); "
                             "write a wider --dtype (bfloat16 or float32)")
    raise NonFiniteError(f"tensor {name!r}: {count} merged value(s) are NaN/Inf although the inputs are finite (the "
                         f"weighted sum leaves {dtype}'s range); use smaller weights/scale or a wider dtype; nothing "
                         "was written")


def _aligned_sources(checkpoints: Sequence[Checkpoint], spec_path: str, progress: bool = False):
    """Weight matching of every checkpoint onto the first (MergeMany for more than two), from the
    files and the spec alone, out of core for two models (tensors read when a group needs them);
    returns one tensor getter per checkpoint, like Checkpoint.read, that permutes on the way out.

    The checkpoints are the states weight matching reads: read-on-access mappings, so it reads each
    group's tensors when it needs them (from the page cache after the first pass) and memory holds a
    few tensors, not the models; their tensor_bytes gives sizes without reading (its chunking)."""
    for c in checkpoints:  # before matching: a NaN would poison every cost matrix (a tensor at a time)
        for name in c.keys():
            check_inputs_finite(name, [c.read(name)], [c.path])
    shapes = {k: tuple(checkpoints[0].shape(k)) for k in checkpoints[0].keys()}
    if spec_path == "auto":  # from the Hugging Face config.json next to the first model
        spec = spec_from_config(config_folder(checkpoints[0].path), shapes)
    else:
        try:
            with open(spec_path) as f:
                text = f.read()
        except OSError as exc:
            raise CheckpointError(f"{spec_path}: cannot read the spec ({exc})") from None
        spec = spec_from_yaml(text, shapes)
    if spec.folds:
        # BatchNorms folded into their producers first, as in-memory alignment does: a BatchNorm
        # divides away any positive per-channel scale of its producer, so raw weights of one function
        # can differ; the folded ones cannot. Permutations found on folded weights permute the raw
        # ones exactly. The states are read into memory for that (BatchNorm networks are CNNs).
        states = [fold_state(spec, {k: c.read(k).clone() for k in c.keys()}) for c in checkpoints]
        perms, _ = weight_matching(folded_spec(spec), states, reference=0, progress=progress)
        del states
    else:
        perms, _ = weight_matching(spec, checkpoints, reference=0, progress=progress)

    def getter(checkpoint, perm):
        if perm is None:
            return checkpoint.read
        return lambda name, buffer=None: apply_permutations(spec, {name: checkpoint.read(name, buffer)}, perm)[name]

    return [getter(c, None if i == 0 else perms[i]) for i, c in enumerate(checkpoints)]
