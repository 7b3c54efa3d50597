"""`fastmerge merge`: merge checkpoint files of models that share a base (linear, task arithmetic,
TIES, DARE, SLERP), streamed tensor by tensor into (sharded) safetensors.

The flags and a YAML config (--config) are equivalent; the config follows mergekit's layout where
the concepts match:

    merge_method: ties            # linear | task_arithmetic | ties | dare | slerp
    base_model: ./base            # task_arithmetic, ties, dare
    models:
      - model: ./finetune-a
        parameters: {weight: 1.0}
      - model: ./finetune-b
    parameters: {density: 0.5, lambda: 1.0, t: 0.5, seed: 0}
    dtype: bfloat16
    out_path: ./merged            # or -o on the command line (which wins)
"""

from __future__ import annotations

import argparse

from ..errors import InvalidArgumentError


def add_parser(sub) -> None:
    p = sub.add_parser("merge", help="merge checkpoint files (linear, task_arithmetic, ties, dare, slerp)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", help="checkpoints: .safetensors files, folders (sharded or not), .pt/.bin")
    p.add_argument("-o", "--output", help="a .safetensors file, or a folder for model.safetensors / shards + index")
    p.add_argument("--config", help="YAML file with the merge (see above); flags given too override it")
    p.add_argument("--method", choices=("linear", "task_arithmetic", "ties", "dare", "slerp"), default=None,
                   help="default: linear")
    p.add_argument("--base", help="the model the others were fine-tuned from (task_arithmetic, ties, dare)")
    p.add_argument("--weights", type=float, nargs="+", help="one weight per model")
    p.add_argument("--scale", type=float, help="lambda: factor of the summed task vectors (default 1)")
    p.add_argument("--density", type=float, help="ties/dare: fraction of each task vector kept (default 0.5)")
    p.add_argument("--t", type=float, help="slerp: position from the first model (0) to the second (1), default 0.5")
    p.add_argument("--seed", type=int, help="dare: seed of the random masks (default 0)")
    p.add_argument("--align", choices=("weight_matching",),
                   help="permute the models onto the first before merging (models from different initialisations; "
                        "needs --spec)")
    p.add_argument("--spec", help="for --align: the architecture's merge spec (YAML from fastmerge.spec.save_spec), "
                                  "or 'auto' to infer it from the Hugging Face config.json next to the first model")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16", "float64"),
                   help="dtype of the merged floating tensors (default: as the inputs)")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--dry-run", action="store_true", help="check the inputs and print the plan; write nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def _from_config(path: str) -> dict:
    import yaml

    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidArgumentError(f"{path}: cannot read the config ({exc})") from None
    if not isinstance(config, dict):
        raise InvalidArgumentError(f"{path}: the config must be a mapping (merge_method, models, ...)")
    known = {"merge_method", "base_model", "models", "parameters", "dtype", "out_path"}
    unknown = set(config) - known
    if unknown:
        raise InvalidArgumentError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    models, weights = [], []
    for i, entry in enumerate(config.get("models") or []):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise InvalidArgumentError(f"{path}: models[{i}] needs a 'model' path")
        models.append(str(entry["model"]))
        weights.append((entry.get("parameters") or {}).get("weight"))
    params = config.get("parameters") or {}
    return {"method": config.get("merge_method"), "base": config.get("base_model"), "models": models,
            "weights": None if all(w is None for w in weights) else [1.0 if w is None else float(w) for w in weights],
            "scale": params.get("lambda", params.get("scale")), "density": params.get("density"),
            "t": params.get("t"), "seed": params.get("seed"), "dtype": config.get("dtype"),
            "output": config.get("out_path")}


def run(args: argparse.Namespace) -> int:
    from ..merge.checkpoints import merge_checkpoints, plan_merge
    from ..merge.same_init import SameInitOptions

    settings = _from_config(args.config) if args.config else {}
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
                  overwrite=args.overwrite, align=args.align, spec=args.spec)
    if args.dry_run:
        plan = plan_merge(models, settings["output"], options, **common)[0]
        print(plan.describe())
        return 0
    plan = merge_checkpoints(models, settings["output"], options, progress=not args.quiet, **common)
    if not args.quiet:
        print("\n".join(f"wrote {p}" for p in plan.output_files))
    return 0
