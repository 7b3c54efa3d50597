"""`fastmerge merge`: merge checkpoint files of models that share a base (linear, task arithmetic,
TIES, DARE, SLERP), streamed tensor by tensor into (sharded) safetensors; or of models trained from
different initialisations, aligned first: by weight matching from the files (--align
weight_matching --spec), or on data (--align permute|cca|zipit with --model and --data; also under
torchrun, each rank passing its shard of the data).

The flags and a YAML config (--config) are equivalent; the config follows mergekit's layout where
the concepts match:

    merge_method: ties            # linear | task_arithmetic | ties | dare | slerp
    base_model: ./base            # task_arithmetic, ties, dare
    models:
      - model: ./finetune-a
        parameters: {weight: 1.0}
      - model: ./finetune-b
    parameters: {density: 0.5, lambda: 1.0, t: 0.5, seed: 0}
    # linear: weights divided by their sum, as mergekit does (normalize: false keeps them as
    # given); any other key is refused, never silently dropped
    dtype: bfloat16
    out_path: ./merged            # or -o on the command line (which wins)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import stat
import sys

import torch.distributed
import yaml

from .. import distributed
from ..alignment import METHODS as ALIGNMENT_METHODS
from ..errors import InvalidArgumentError
from ..io import DTYPES
from ..merging import METHODS as SAME_INIT_METHODS
from ..merging.checkpoints import merge_checkpoints, plan_merge
from ..merging.same_init import SameInitOptions
from ..merging.with_data import merge_files_with_data
from ..stages import record_stages, stage_summary
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
    data = p.add_argument_group("aligning on data (--model): the architecture from Python, statistics from batches")
    data.add_argument("--model", metavar="MODULE:ATTR",
                      help="builds the architecture: module:callable or file.py:callable returning an nn.Module")
    data.add_argument("--model-kwargs", metavar="JSON", help="keyword arguments for --model, as a JSON object")
    data.add_argument("--data", metavar="REF", help="batches: digits | mnist5k (built-in real data, ':val' for the "
                                                    "validation split) or module:attr (an iterable, or a callable "
                                                    "returning one); (inputs, targets) for np_merge")
    data.add_argument("--val-data", metavar="REF", help="np_merge: held-out batches to choose the step count on")
    data.add_argument("--batch-size", type=int, default=256, help="batch size of the built-in data (default 256)")
    data.add_argument("--repair", choices=("auto", "none", "reset", "repair"), default="auto",
                      help="after averaging: BatchNorm reset (auto when the model has BatchNorm), REPAIR, or none")
    data.add_argument("--np-steps", type=int, default=300, help="np_merge: optimisation steps (default 300)")
    data.add_argument("--np-lr", type=float, default=1e-2, help="np_merge: learning rate (default 0.01)")
    data.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: cuda:LOCAL_RANK, NCCL)")
    p.add_argument("--dtype", choices=tuple(DTYPES),
                   help="dtype of the merged floating tensors (default: as the inputs)")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="merge NaN/Inf input values and write NaN/Inf merged ones (refused by default)")
    p.add_argument("--dry-run", action="store_true", help="check the inputs and print the plan; write nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


class _NoAliasLoader(yaml.SafeLoader):
    """safe_load without aliases: a merge config needs none, and a few nested aliases (a "billion
    laughs" document) expand into more nodes than memory holds."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a merge config",
                                              self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        # YAML keeps the last of a repeated key: `models:` twice would merge models the reader
        # of the file never meant; refused instead
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)):
                continue  # an unhashable key: construct_mapping refuses it below
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} appears more than once "
                                                        "(duplicate keys are refused)", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 (PyYAML) reads 1e-3 as a string: floats need a dot there. mergekit's configs are read by
# pydantic, which takes "1e-3" as a number, so they write it that way: resolve it as YAML 1.2 does.
_NoAliasLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _typed(path: str, key: str, value, kind: str):
    """`value` of config key `key` when it has the type `kind` ("text", "number", "integer"), or None."""
    if value is None:
        return None
    ok = {"text": isinstance(value, str),
          "number": isinstance(value, (int, float)) and not isinstance(value, bool),
          "integer": isinstance(value, int) and not isinstance(value, bool)}[kind]
    if not ok:
        raise InvalidArgumentError(f"{path}: {key} must be {'a' if kind != 'integer' else 'an'} {kind}, "
                                   f"got {value!r}")
    return value


def _mapping(path: str, key: str, value) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgumentError(f"{path}: {key} must be a mapping of names to values, got {value!r}")
    return value


MAX_CONFIG_BYTES = 2**20  # a merge config is a few hundred bytes


def _from_config(path: str) -> dict:
    try:
        # a regular file only: a FIFO or device (/dev/zero) would block or never end
        with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK)) as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise InvalidArgumentError(f"{path}: not a regular file; give the merge config as a YAML file")
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise InvalidArgumentError(f"{path}: over {MAX_CONFIG_BYTES // 2**20} MiB; not a merge config")
        config = yaml.load(raw.decode("utf-8"), Loader=_NoAliasLoader)  # noqa: S506 (a SafeLoader subclass)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise InvalidArgumentError(f"{path}: cannot read the config ({str(exc)[:300]})") from None
    except RecursionError:
        raise InvalidArgumentError(f"{path}: cannot read the config (nested too deeply)") from None
    if not isinstance(config, dict):
        raise InvalidArgumentError(f"{path}: the config must be a mapping (merge_method, models, ...)")
    known = {"merge_method", "base_model", "models", "parameters", "dtype", "out_path"}
    unknown = set(config) - known
    if unknown:
        raise InvalidArgumentError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    entries = config.get("models") or []
    if not isinstance(entries, list):
        raise InvalidArgumentError(f"{path}: models must be a list of entries (- model: PATH), got {entries!r}")
    models, weights = [], []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise InvalidArgumentError(f"{path}: models[{i}] needs a 'model' path")
        if not isinstance(entry["model"], str) or not entry["model"]:
            raise InvalidArgumentError(f"{path}: models[{i}].model must be a path, got {entry['model']!r}")
        models.append(entry["model"])
        own = _mapping(path, f"models[{i}].parameters", entry.get("parameters"))
        _known(path, f"models[{i}].parameters", own, ("weight",))
        weights.append(_typed(path, f"models[{i}].parameters.weight", own.get("weight"), "number"))
    params = _mapping(path, "parameters", config.get("parameters"))
    _known(path, "parameters", params, ("lambda", "scale", "density", "t", "seed", "normalize"))
    normalize = params.get("normalize")
    if normalize is not None and not isinstance(normalize, bool):
        raise InvalidArgumentError(f"{path}: parameters.normalize must be true or false, got {normalize!r}")
    number = {key: _typed(path, f"parameters.{key}", params.get(key), "number")
              for key in ("lambda", "scale", "density", "t")}
    return {"method": _typed(path, "merge_method", config.get("merge_method"), "text"),
            "base": _typed(path, "base_model", config.get("base_model"), "text"), "models": models,
            "weights": None if all(w is None for w in weights) else [1.0 if w is None else float(w) for w in weights],
            "scale": number["lambda"] if number["lambda"] is not None else number["scale"],
            "density": number["density"], "t": number["t"],
            "seed": _typed(path, "parameters.seed", params.get("seed"), "integer"),
            "dtype": _typed(path, "dtype", config.get("dtype"), "text"), "normalize": normalize,
            "output": _typed(path, "out_path", config.get("out_path"), "text")}


def _known(path: str, where: str, values: dict, known: tuple) -> None:
    """A key fastmerge would not honour is refused, never dropped (mergekit may mean something by it)."""
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise InvalidArgumentError(f"{path}: {where}.{unknown[0]} is not supported by fastmerge's config "
                                   f"(it takes {', '.join(known)} there); remove it")


def _normalized(settings: dict) -> list[float] | None:
    """A config's linear weights as mergekit reads them: divided by their sum unless normalize: false."""
    weights, method, normalize = settings.get("weights"), settings.get("method") or "linear", settings.get("normalize")
    if normalize is not None and method != "linear":
        raise InvalidArgumentError(f"parameters.normalize applies to linear merges here, not to {method}; remove it")
    if weights is None or method != "linear" or normalize is False:
        return weights
    if not all(math.isfinite(w) for w in weights):
        raise InvalidArgumentError(f"weights must be finite numbers, got {weights}")
    total = sum(weights)
    if not math.isfinite(total):
        raise InvalidArgumentError(f"the linear weights {weights} sum past a float's range: they cannot be "
                                   "normalised; give smaller weights (only their ratios matter)")
    if total == 0:
        raise InvalidArgumentError("the linear weights sum to 0: they cannot be normalised (mergekit's default); "
                                   "set parameters.normalize: false to use them as they are")
    return [w / total for w in weights]


def run(args: argparse.Namespace) -> int:
    if args.model or (args.align is not None and ALIGNMENT_METHODS[args.align].statistics is not None):
        return _run_with_data(args)
    if args.method == "np_merge":
        raise InvalidArgumentError("--method np_merge learns coefficients on data: give --model, --data and --align")
    settings = _from_config(args.config) if args.config else {}
    if args.config:
        settings["weights"] = _normalized({**settings, **({"method": args.method} if args.method else {})})
    for key in ("method", "base", "weights", "scale", "density", "t", "seed", "dtype", "output"):
        value = getattr(args, key)
        if value is not None:
            settings[key] = value
    models = args.models or settings.get("models") or []
    if not models:
        raise InvalidArgumentError("no models to merge: list checkpoint paths (or models: in --config)")
    if not settings.get("output"):
        raise InvalidArgumentError("no output: give -o PATH (or out_path: in --config)")
    defaults = SameInitOptions()
    options = SameInitOptions(
        method=settings.get("method") or "linear",
        weights=tuple(settings["weights"]) if settings.get("weights") else None,
        scale=float(settings["scale"]) if settings.get("scale") is not None else defaults.scale,
        density=float(settings["density"]) if settings.get("density") is not None else defaults.density,
        t=float(settings["t"]) if settings.get("t") is not None else defaults.t,
        seed=int(settings["seed"]) if settings.get("seed") is not None else defaults.seed)
    common = dict(base=settings.get("base"), dtype=settings.get("dtype"), max_shard_size=args.max_shard_size,
                  overwrite=args.overwrite, align=args.align, spec_file=args.spec)
    if args.dry_run:
        plan = plan_merge(models, settings["output"], options, **common)[0]
        print(plan.describe())
        return 0
    with record_stages() as times:
        plan = merge_checkpoints(models, settings["output"], options, progress=not args.quiet,
                                 allow_nonfinite=args.allow_nonfinite, **common)
    if not args.quiet:
        print("\n".join(f"wrote {p}" for p in plan.output_files))
        print(stage_summary(times), file=sys.stderr)
    return 0


def _run_with_data(args: argparse.Namespace) -> int:
    """--model: build the architecture, load the files, align on --data and merge (torchrun-aware)."""
    if not args.model:
        raise InvalidArgumentError(f"--align {args.align} works on activations: give --model MODULE:ATTR (the "
                                   "architecture) and --data (batches)")
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
        raise InvalidArgumentError("--model needs --data: the spec is traced, statistics collected (and np_merge "
                                   "trained) on its batches")
    if args.dry_run:
        raise InvalidArgumentError("--dry-run is for the streamed merges; an aligned merge on data has no plan to print")
    try:
        kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(f"--model-kwargs is not valid JSON ({exc})") from None
    if not isinstance(kwargs, dict):
        raise InvalidArgumentError("--model-kwargs must be a JSON object of keyword arguments")
    owned = distributed.init_from_environment(args.device)  # torchrun: join (or create) the process group
    try:
        with record_stages() as times:
            files = merge_files_with_data(
                args.models, args.output, build_model=model_factory(args.model, kwargs),
                data=data_from(args.data, args.batch_size) if args.data else None, align=args.align or "none",
                method=method, weights=args.weights, repair_mode=args.repair,
                val_data=data_from(args.val_data, args.batch_size) if args.val_data else None,
                np_options={"steps": args.np_steps, "lr": args.np_lr}, dtype=args.dtype,
                max_shard_size=args.max_shard_size, overwrite=args.overwrite, device=args.device,
                progress=not args.quiet, allow_nonfinite=args.allow_nonfinite)
        if not args.quiet and distributed.rank() == 0:
            print("\n".join(f"wrote {p}" for p in files))
            print(stage_summary(times), file=sys.stderr)
    finally:
        if owned:
            torch.distributed.destroy_process_group()
    return 0
