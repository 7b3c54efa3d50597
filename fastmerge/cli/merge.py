"""`fastmerge merge`: merge checkpoint files of models that share a base (linear, task arithmetic,
TIES, DARE, SLERP), streamed tensor by tensor into (sharded) safetensors; or of models trained from
different initialisations, aligned first: by weight matching from the files (--align
weight_matching --spec), or on data (--align permute|cca|zipit with --model and --data; also under
torchrun, each rank passing its shard of the data).

The flags and a YAML config (--config) are equivalent; the config is mergekit's language, read as
mergekit reads it (fastmerge/cli/merge_config.py says what is supported and what is refused):

    merge_method: ties            # linear | task_arithmetic | ties | slerp (| dare: fastmerge's own)
    base_model: ./base            # task_arithmetic, ties, dare; slerp: t measures from it
    models:
      - model: ./finetune-a
        parameters: {weight: 1.0, density: 0.5}
      - model: ./finetune-b
        parameters: {weight: 0.5, density: 0.7}
    parameters: {lambda: 1.0, normalize: true}
    dtype: bfloat16
    out_path: ./merged            # or -o on the command line (which wins)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys

import torch
import torch.distributed

from .. import distributed
from ..alignment import METHODS as ALIGNMENT_METHODS
from ..errors import InvalidArgumentError
from ..io import DTYPES, Checkpoint
from ..io.text import TextBatches, is_text_file, load_tokenizer
from ..merging import METHODS as SAME_INIT_METHODS
from ..merging.checkpoints import merge_checkpoints, plan_merge
from ..merging.passthrough import describe_passthrough, passthrough
from ..merging.slices import MergedSlice, describe_slices, merge_slices
from ..merging.same_init import SameInitOptions
from ..merging.with_data import merge_files_with_data
from ..spec.hf_config import model_builder
from ..stages import record_stages, stage_summary
from .merge_config import read_config
from .references import data_from, model_factory


def add_parser(sub) -> None:
    p = sub.add_parser("merge", help=f"merge checkpoint files ({', '.join(SAME_INIT_METHODS)})",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", help="checkpoints: .safetensors files, folders (sharded or not), .pt/.bin")
    p.add_argument("-o", "--output", help="a .safetensors file, or a folder for model.safetensors / shards + index")
    p.add_argument("--config", help="YAML file with the merge (see above); flags given too override it")
    p.add_argument("--method", choices=(*SAME_INIT_METHODS, "np_merge"),
                   default=None, help="default: linear (with --model: linear = weighted average, or np_merge)")
    p.add_argument("--base", help="the model the others were fine-tuned from (task_arithmetic, ties, dare)")
    p.add_argument("--weights", type=float, nargs="+", help="one weight per model")
    p.add_argument("--scale", type=float, help="lambda: factor of the summed task vectors (default 1)")
    p.add_argument("--density", type=float, help="ties/dare: fraction of each task vector kept (default 0.5)")
    p.add_argument("--t", type=float, help="slerp: position from the first model (0) to the second (1), default 0.5")
    p.add_argument("--seed", type=int, help="dare: seed of the random masks (default 0)")
    p.add_argument("--align", choices=tuple(ALIGNMENT_METHODS),
                   help="align the models onto the first before merging (models from different initialisations): "
                        "weight_matching from the files with --spec, or any method with --model (and --data)")
    p.add_argument("--spec", help="for --align: the architecture's merge spec (YAML from fastmerge.spec.save_spec), "
                                  "or 'auto' to infer it from the Hugging Face config.json next to the first model")
    data = p.add_argument_group("aligning on data: the architecture from Python (--model) or from a Hugging Face "
                                "folder's config.json, statistics from batches")
    data.add_argument("--model", metavar="MODULE:ATTR",
                      help="builds the architecture: module:callable or file.py:callable returning an nn.Module "
                           "(default for Hugging Face folders: the model transformers builds from config.json)")
    data.add_argument("--model-kwargs", metavar="JSON", help="keyword arguments for --model, as a JSON object")
    data.add_argument("--data", metavar="REF", help="batches: digits | mnist5k (built-in real data, ':val' for the "
                                                    "validation split), a text corpus FILE.txt or FILE.jsonl ('text' "
                                                    "per line; tokenised with the first model folder's tokenizer), "
                                                    "or module:attr (an iterable, or a callable returning one); "
                                                    "(inputs, targets) for np_merge")
    data.add_argument("--val-data", metavar="REF", help="np_merge: held-out batches to choose the step count on")
    data.add_argument("--batch-size", type=int, default=None,
                      help="batch size of the built-in data (default 256) or of a text corpus (default 16 windows)")
    data.add_argument("--seq-len", type=int, help="a text corpus: tokens per window (default 128)")
    data.add_argument("--max-batches", type=int,
                      help="a text corpus: at most this many batches are read (default 64)")
    data.add_argument("--repair", choices=("auto", "none", "reset", "repair"), default="auto",
                      help="after averaging: BatchNorm reset (auto when the model has BatchNorm), REPAIR, or none")
    data.add_argument("--np-steps", type=int, default=300, help="np_merge: optimisation steps (default 300)")
    data.add_argument("--np-lr", type=float, default=1e-2, help="np_merge: learning rate (default 0.01)")
    data.add_argument("--np-distill", type=float, default=0.0, metavar="SHARE",
                      help="np_merge: share of the loss that matches the input models' ensemble instead of the "
                           "targets, 0..1 (default 0; 1: --data needs no targets)")
    data.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: cuda:LOCAL_RANK, NCCL)")
    p.add_argument("--dtype", choices=tuple(DTYPES),
                   help="dtype of the merged floating tensors (default: as the inputs)")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--mergekit-compat", action="store_true",
                   help="compute as mergekit 0.1.5 does, to the bit, where fastmerge computes otherwise (TIES on "
                        "bfloat16/float16 checkpoints; ties at the edges of breadcrumbs' bands; the angles of "
                        "slerp, model_stock, nuslerp, multislerp and karcher): as slow as mergekit")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="merge NaN/Inf input values and write NaN/Inf merged ones (refused by default)")
    p.add_argument("--dry-run", action="store_true", help="check the inputs and print the plan; write nothing")
    kit = p.add_argument_group("mergekit-yaml's habits: `fastmerge merge CONFIG.yml OUT` (or --config CONFIG.yml "
                               "OUT) and its flags")
    kit.add_argument("--out-shard-size", metavar="SIZE",
                     help="mergekit's shard size: a count of bytes with K, M or B (thousand, million, billion), "
                          "e.g. 5B; the same as --max-shard-size in bytes")
    kit.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=True,
                     help="a folder output gets the tokenizer files of the base (else the first model)")
    kit.add_argument("--write-model-card", action=argparse.BooleanOptionalAction, default=True,
                     help="a folder output gets a README.md naming the inputs, method and parameters")
    kit.add_argument("--random-seed", type=int, help="the seed of random masks (as --seed)")
    kit.add_argument("--own-masks", action="store_true",
                     help="run a config's dare_linear, dare_ties, della or della_linear with fastmerge's own "
                          "reproducible random masks (mergekit's come from torch's generator: the merge differs by "
                          "its draws)")
    kit.add_argument("--allow-unknown", action="store_true",
                     help="ignore config keys no method reads, with a warning (mergekit ignores them); by default "
                          "they are refused")
    for flag, why in (("--cuda", "the checkpoint merges run on the CPU"),
                      ("--allow-crimes", "tensors must match in name, shape and dtype anyway"),
                      ("--lazy-unpickle", "inputs are memory-mapped, never unpickled whole"),
                      ("--low-cpu-memory", "one tensor at a time is in memory"),
                      ("--trust-remote-code", "no model code is run"),
                      ("--gpu-rich", "mergekit's alias for its GPU flags; the checkpoint merges run on the CPU")):
        kit.add_argument(flag, action="store_true", help=f"accepted, no effect: {why}")
    for flag, why in (("--read-to-gpu", "the checkpoint merges run on the CPU"),
                      ("--multi-gpu", "the checkpoint merges run on the CPU"),
                      ("--async-write", "each tensor is written by a thread while the next one is merged"),
                      ("--clone-tensors", "a layer used twice is written twice anyway")):
        kit.add_argument(flag, action=argparse.BooleanOptionalAction, default=False, help=f"accepted, no effect: {why}")
    for flag, why in (("--write-threads", "one writer thread"), ("--lora-merge-cache", "adapters are merged as read"),
                      ("--transformers-cache", "nothing is downloaded")):
        kit.add_argument(flag, metavar="VALUE", help=f"accepted, no effect: {why}")
    kit.add_argument("-j", "--num-threads", type=int, metavar="N", help="threads for the merge's arithmetic")
    kit.add_argument("--safe-serialization", action=argparse.BooleanOptionalAction, default=True,
                     help="outputs are safetensors (--no-safe-serialization, pickled .bin files, is refused)")
    kit.add_argument("--unsafe-truncate-embeddings", action=argparse.BooleanOptionalAction, default=False,
                     help="refused: merge differing vocabularies with tokenizer_source instead")
    kit.add_argument("--lora-merge-dtype", metavar="DTYPE",
                     help="refused: adapters are merged as PEFT's merge_and_unload does")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.num_threads is None:
        return _run(args)
    if args.num_threads < 1:
        raise InvalidArgumentError(f"--num-threads must be at least 1, got {args.num_threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(args.num_threads)
    try:
        return _run(args)
    finally:  # main() called in-process (tests, a notebook) gets its thread count back
        torch.set_num_threads(before)


def _run(args: argparse.Namespace) -> int:
    if args.model or (args.align is not None and ALIGNMENT_METHODS[args.align].statistics is not None):
        return _run_with_data(args)
    if args.method == "np_merge":
        raise InvalidArgumentError("--method np_merge learns coefficients on data: give --model, --data and --align")
    _mergekit_positionals(args)
    settings = read_config(args.config, args.allow_unknown, args.own_masks) if args.config else {}
    for given, refusal in ((not args.safe_serialization, "--no-safe-serialization: fastmerge writes safetensors only "
                                                          "(no pickled .bin files); drop the flag"),
                           (args.unsafe_truncate_embeddings, "--unsafe-truncate-embeddings is not supported: merge "
                                                             "models with differing vocabularies through "
                                                             "tokenizer_source: union (or base) instead"),
                           (args.lora_merge_dtype is not None, "--lora-merge-dtype is not supported: a model+lora "
                                                               "adapter is merged as PEFT's merge_and_unload does")):
        if given:
            raise InvalidArgumentError(refusal)
    if args.random_seed is not None and args.seed is None:
        args.seed = args.random_seed
    if args.out_shard_size is not None:
        args.max_shard_size = _kmb(args.out_shard_size)
    if settings.get("method") == "passthrough":
        return _run_passthrough(settings, args)
    if settings.get("merged_slices") is not None:
        return _run_merged_slices(settings, args)
    settings.update(_given(args))
    models = args.models or settings.get("models") or []
    if not models:
        raise InvalidArgumentError("no models to merge: list checkpoint paths (or models: in --config)")
    if len(models) == 1 and not args.config and (settings.get("method") or "linear") == "linear":
        raise InvalidArgumentError("linear needs at least 2 models: list two or more checkpoints")
    if not settings.get("output"):
        raise InvalidArgumentError("no output: give -o PATH (or out_path: in --config)")
    options = _options(settings, args)
    tensor_options = None
    if settings.get("tensor_parameters") is not None:  # gradients or filters: options per tensor
        given = _given(args)  # flags still override every tensor's
        tensor_options = {name: _options({**settings, **own, **given}, args) for name, own in
                          settings["tensor_parameters"].tensor_settings(Checkpoint(models[0]).keys()).items()}
        options = next(iter(tensor_options.values()), options)  # the plan and metadata show the first's
    common = dict(base=settings.get("base"), dtype=settings.get("dtype"), max_shard_size=args.max_shard_size,
                  overwrite=args.overwrite, align=args.align, spec_file=args.spec,
                  copy_tokenizer=args.copy_tokenizer, write_card=args.write_model_card, tensor_options=tensor_options,
                  tokenizer=settings.get("tokenizer"), chat_template=settings.get("chat_template"),
                  input_dtype=settings.get("input_dtype"))
    if args.dry_run:
        plan = plan_merge(models, settings["output"], options, **common)[0]
        print(plan.describe())
        _note_mergekit_differences(args, (tensor_options or {}).values() or [options], models[0],
                                   settings.get("input_dtype"))
        return 0
    with record_stages() as times:
        plan = merge_checkpoints(models, settings["output"], options, progress=not args.quiet,
                                 allow_nonfinite=args.allow_nonfinite, **common)
    _note_mergekit_differences(args, (tensor_options or {}).values() or [options], models[0],
                               settings.get("input_dtype"))
    if not args.quiet:
        print("\n".join(f"wrote {p}" for p in plan.output_files))
        print(stage_summary(times), file=sys.stderr)
    return 0


def _slices_output(settings: dict, args: argparse.Namespace, kind: str) -> str:
    """The output of a slices or passthrough config, whose models and parameters come from the
    config alone."""
    if args.models or any(getattr(args, k) is not None for k in ("method", "base", "weights", "scale", "density", "t")):
        raise InvalidArgumentError(f"a {kind} config takes its models and parameters from its slices: give only "
                                   "the output (and --dtype, shard and folder options)")
    output = args.output or settings.get("output")
    if not output:
        raise InvalidArgumentError("no output: give -o PATH (or out_path: in --config)")
    return output


def _run_merged_slices(settings: dict, args: argparse.Namespace) -> int:
    """A config's slices merged by a method (layer ranges merged layer by layer)."""
    output = _slices_output(settings, args, "slices")
    if args.align is not None:
        raise InvalidArgumentError("--align does not apply to a slices config")

    def options_of(own: dict):
        numbers = own.get("tensor_parameters")

        def options(name: str, t: float):
            chosen = _options({**own, **(numbers.resolve(name, t) if numbers is not None else {})}, args)
            chosen.validate(len(own["models"]), own.get("base") is not None)
            return chosen

        return options

    slices = [MergedSlice(models=tuple(own["models"]), ranges=tuple(own["ranges"]), options=options_of(own),
                          base=own.get("base"), base_range=own.get("base_range")) for own in settings["merged_slices"]]
    shared = [_options(own, args) for own in settings["merged_slices"]]  # each slice's, before gradients
    if args.dry_run:
        print(describe_slices(slices, settings.get("tokenizer")))
        _note_mergekit_differences(args, shared, slices[0].models[0], settings.get("input_dtype"))
        return 0
    done = _write_layered(merge_slices, slices, output, settings, args)
    _note_mergekit_differences(args, shared, slices[0].models[0], settings.get("input_dtype"))
    return done


def _run_passthrough(settings: dict, args: argparse.Namespace) -> int:
    """A config's passthrough slices (layer ranges stacked into a new model)."""
    output = _slices_output(settings, args, "passthrough")
    if args.dry_run:
        print(describe_passthrough(settings["slices"], settings.get("base"), settings.get("tokenizer")))
        return 0
    return _write_layered(passthrough, settings["slices"], output, settings, args, base=settings.get("base"),
                          shared_scale=settings.get("scale"))


def _write_layered(write, slices, output: str, settings: dict, args: argparse.Namespace, **own) -> int:
    """Runs merge_slices or passthrough with the CLI's output options; prints what it wrote."""
    with record_stages() as times:
        files = write(slices, output, dtype=args.dtype or settings.get("dtype"), max_shard_size=args.max_shard_size,
                      overwrite=args.overwrite, copy_tokenizer=args.copy_tokenizer, write_card=args.write_model_card,
                      allow_nonfinite=args.allow_nonfinite, progress=not args.quiet,
                      tokenizer=settings.get("tokenizer"), chat_template=settings.get("chat_template"),
                      input_dtype=settings.get("input_dtype"), **own)
    if not args.quiet:
        print("\n".join(f"wrote {p}" for p in files))
        print(stage_summary(times), file=sys.stderr)
    return 0


def _note_mergekit_differences(args: argparse.Namespace, option_sets, model: str, loaded: str | None) -> None:
    """A mergekit config whose method fastmerge computes otherwise than mergekit by default: one
    line on stderr naming how, never a silent difference (--mergekit-compat removes it). `loaded`:
    the config's dtype, which the inputs are read in."""
    if not args.config:
        return
    checkpoint = Checkpoint(model)
    dtype = next((checkpoint.dtype(n) for n in checkpoint.keys() if checkpoint.dtype(n).is_floating_point), None)
    if DTYPES.get(loaded) in (torch.bfloat16, torch.float16):  # rounded to half precision as read: its ties
        dtype = DTYPES[loaded]
    notes = {}
    for options in option_sets:
        text = SAME_INIT_METHODS[options.method].mergekit_difference(options, dtype)
        if text:
            notes[(options.method, text)] = None
    for method, text in notes:
        print(f"fastmerge merge: note: {method}: {text}; --mergekit-compat computes mergekit's tensors to the bit",
              file=sys.stderr)


def _given(args: argparse.Namespace) -> dict:
    """The settings given as flags: they override the config's."""
    given = {key: getattr(args, key) for key in ("method", "base", "weights", "scale", "density", "t", "seed", "dtype",
                                                  "output") if getattr(args, key) is not None}
    if "density" in given:
        given["densities"] = None  # --density applies to every model
    return given


_OPTION_FIELDS = {f.name for f in dataclasses.fields(SameInitOptions)}


def _options(settings: dict, args: argparse.Namespace) -> SameInitOptions:
    """SameInitOptions from the settings that name its fields (lists as tuples); the rest default."""
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()
             if k in _OPTION_FIELDS and v is not None}
    return SameInitOptions(**{**given, "method": settings.get("method") or "linear",
                              "mergekit_compat": args.mergekit_compat})


def _mergekit_positionals(args: argparse.Namespace) -> None:
    """mergekit-yaml's `CONFIG OUT`: `fastmerge merge c.yml out/` or `fastmerge merge --config c.yml
    out/` read the config and write to the last argument (the models come from the config)."""
    if not args.config and args.models and args.models[0].endswith((".yml", ".yaml")):
        args.config, args.models = args.models[0], args.models[1:]
    if args.config and len(args.models) == 1 and not args.output:
        args.output, args.models = args.models[0], []
    elif args.config and args.models:
        raise InvalidArgumentError("with a config, give the output as one argument (or -o); the models come from "
                                   "the config's models:")


def _kmb(text: str) -> int:
    """mergekit's sizes: 5B = 5 billion bytes, 500M, 64K, or a plain count."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMB]?)\s*", text, flags=re.IGNORECASE)
    if not match:
        raise InvalidArgumentError(f"--out-shard-size {text!r}: write a count of bytes with K, M or B, e.g. 5B")
    size = int(float(match.group(1)) * {"": 1, "K": 10**3, "M": 10**6, "B": 10**9}[match.group(2).upper()])
    if not 1 <= size <= 2**62:
        raise InvalidArgumentError(f"--out-shard-size {text!r}: must be between 1 byte and 2^62")
    return size


def _hf_folder(path: str) -> str | None:
    """The Hugging Face folder (config.json) a checkpoint path is or sits in, else None."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    return folder if os.path.isfile(os.path.join(folder, "config.json")) else None


def _run_with_data(args: argparse.Namespace) -> int:
    """--model (or a Hugging Face folder): build the architecture, load the files, align on --data and
    merge (torchrun-aware)."""
    folder = _hf_folder(args.models[0]) if args.models else None
    if not args.model and folder is None:
        raise InvalidArgumentError(f"--align {args.align} works on activations: give --model MODULE:ATTR (the "
                                   "architecture) and --data (batches), or Hugging Face checkpoint folders "
                                   "(config.json: the architecture is built from it)")
    if args.config or args.base or any(getattr(args, k) is not None for k in ("scale", "density", "t", "seed")):
        raise InvalidArgumentError("--config, --base, --scale, --density, --t and --seed belong to the same-base "
                                   "merges; with --model use --method linear|np_merge and --weights")
    method = {None: "average", "linear": "average", "np_merge": "np_merge"}.get(args.method)
    if method is None:
        raise InvalidArgumentError(f"--method {args.method} with --model: use linear (weighted average after "
                                   "alignment) or np_merge")
    if not args.output:
        raise InvalidArgumentError("no output: give -o PATH")
    if args.data is None:
        raise InvalidArgumentError("aligning on data needs --data: the spec is traced, statistics collected (and np_merge "
                                   "trained) on its batches")
    if args.dry_run:
        raise InvalidArgumentError("--dry-run is for the streamed merges; an aligned merge on data has no plan to print")
    try:
        kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(f"--model-kwargs is not valid JSON ({exc})") from None
    if not isinstance(kwargs, dict):
        raise InvalidArgumentError("--model-kwargs must be a JSON object of keyword arguments")
    if args.model:
        build = model_factory(args.model, kwargs)
    else:
        first = Checkpoint(args.models[0])
        build = model_builder(folder, {n: tuple(first.shape(n)) for n in first.keys()})

    def batches(reference):
        if reference is None:
            return None
        if is_text_file(reference):
            if folder is None:
                raise InvalidArgumentError(f"--data {reference}: a text corpus is tokenised with the first model "
                                           "folder's tokenizer; give Hugging Face checkpoint folders")
            return TextBatches(reference, load_tokenizer(folder), seq_len=args.seq_len or 128,
                               batch_size=args.batch_size or 16, max_batches=args.max_batches or 64)
        given = [flag for flag, value in (("--seq-len", args.seq_len), ("--max-batches", args.max_batches))
                 if value is not None]
        if given:  # they shape a text corpus's batches only: never ignored silently
            raise InvalidArgumentError(f"{given[0]} applies to a text corpus (--data FILE.txt or FILE.jsonl), not "
                                       f"--data {reference}")
        return data_from(reference, args.batch_size or 256)

    owned = distributed.init_from_environment(args.device)  # torchrun: join (or create) the process group
    try:
        with record_stages() as times:
            files = merge_files_with_data(
                args.models, args.output, build_model=build, data=batches(args.data), align=args.align or "none",
                method=method, weights=args.weights, repair_mode=args.repair, val_data=batches(args.val_data),
                np_options={"steps": args.np_steps, "lr": args.np_lr, "distill": args.np_distill}, dtype=args.dtype,
                max_shard_size=args.max_shard_size, overwrite=args.overwrite, device=args.device,
                progress=not args.quiet, allow_nonfinite=args.allow_nonfinite, copy_tokenizer=args.copy_tokenizer,
                write_card=args.write_model_card)
        if not args.quiet and distributed.rank() == 0:
            print("\n".join(f"wrote {p}" for p in files))
            print(stage_summary(times), file=sys.stderr)
    finally:
        if owned:
            torch.distributed.destroy_process_group()
    return 0
