"""`fastmerge eval`: judge merges by numbers and pictures, into one folder (metrics.json + PNGs).

    fastmerge eval                       # built-in: digits MLPs (3 seeds) and CNNs (2 seeds)
    fastmerge eval --dataset mnist5k --out eval-mnist
    fastmerge eval a.safetensors b.safetensors [c.safetensors] --model mypkg.models:build \\
        --data mypkg.data:train_batches --test-data mypkg.data:test_batches

For two or three parents: accuracy and loss of each, of their ensemble and of the merges (direct,
permute, weight matching, CCA, NP Merge after permute); the loss and accuracy along the path A -> B
for each alignment with its barrier (BatchNorm reset at every point), the alignment diagnostics per
layer, NP Merge's coefficient histograms, the loss plane through three aligned models, and (the
built-in job) feature pictures of matched CNN channels.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from ..alignment import METHODS as ALIGNMENT_METHODS
from ..datasets import BUILTIN
from ..errors import InvalidArgumentError
from ..eval import report as eval_report
from ..io import load_models
from .references import data_from, model_factory


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="numbers and figures of merges: barriers, loss plane, features",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", help="2 or 3 checkpoints (needs --model and --data); none: the built-in job")
    p.add_argument("--dataset", choices=BUILTIN, default="digits", help="built-in job's data")
    p.add_argument("--out", default="eval", help="folder for metrics.json and the PNGs (default ./eval)")
    p.add_argument("--model", metavar="MODULE:ATTR", help="builds the architecture of the checkpoints")
    p.add_argument("--model-kwargs", metavar="JSON", help="keyword arguments for --model")
    p.add_argument("--data", metavar="REF", help="labelled training batches (statistics, BatchNorm resets, NP Merge)")
    p.add_argument("--test-data", metavar="REF", help="labelled held-out batches (default: --data with ':val' for "
                                                      "the built-in datasets)")
    p.add_argument("--methods", default="permute,weight_matching,cca", help="alignments to compare (comma-separated)")
    p.add_argument("--quick", action="store_true", help="fewer points, steps and epochs: a smoke run")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(ALIGNMENT_METHODS)
    if unknown:
        raise InvalidArgumentError(f"--methods: unknown {sorted(unknown)}; use {', '.join(ALIGNMENT_METHODS)}")
    if not args.models:
        report = eval_report.builtin(args.dataset, args.out, quick=args.quick, methods=methods)
    else:
        report = _from_files(args, methods)
    print(report.table())
    print("\n".join(f"wrote {p}" for p in [os.path.join(args.out, "metrics.json"), *report.figures]))
    return 0


def _from_files(args, methods):
    if not 2 <= len(args.models) <= 3:
        raise InvalidArgumentError(f"eval takes 2 or 3 checkpoints, got {len(args.models)}")
    if not args.model or not args.data:
        raise InvalidArgumentError("evaluating checkpoints needs --model (the architecture) and --data (batches)")
    test_ref = args.test_data or (f"{args.data}:val" if args.data in BUILTIN else None)
    if test_ref is None:
        raise InvalidArgumentError("give --test-data: the numbers are measured on held-out batches")
    try:
        kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(f"--model-kwargs is not valid JSON ({exc})") from None
    models = load_models(args.models, model_factory(args.model, kwargs), torch.device("cpu"))
    report = eval_report.evaluate_merges(models, list(data_from(args.data)), list(data_from(test_ref)), args.out,
                                         methods=methods, steps=6 if args.quick else 11,
                                         np_steps=30 if args.quick else 150, plane_grid=5 if args.quick else 11,
                                         title=", ".join(os.path.basename(p) for p in args.models))
    eval_report.write_json(report.metrics, os.path.join(args.out, "metrics.json"))
    return report
