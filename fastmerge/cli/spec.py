"""`fastmerge spec`: write the merge spec of an architecture as YAML (which weight axes move
together), for `fastmerge merge --align weight_matching --spec FILE` or hand editing.

    fastmerge spec run-a/ -o model.spec.yaml            # from config.json next to the checkpoint
    fastmerge spec --model mypkg.models:build --input-shape 2,3,32,32 -o model.spec.yaml --check

From a checkpoint with a Hugging Face config.json, transformers builds the architecture and
fastmerge traces it, keeping the tensors the checkpoint holds. From --model, the module is traced
on a seeded random input of --input-shape (--input-dtype long: token ids 0); --check then verifies that random
permutations of every group leave the model's outputs unchanged.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch

from ..errors import CheckpointError, InvalidArgumentError
from ..io import Checkpoint
from ..io.dtypes import DTYPES as FLOAT_DTYPES
from ..spec import check_spec, save_spec, trace_spec
from ..spec.hf_config import config_folder, spec_from_config
from .references import model_factory

DTYPES = (*FLOAT_DTYPES, "long")  # --input-dtype: the float dtypes, or token ids
MAX_EXAMPLE_ELEMENTS = 2**26


def add_parser(sub) -> None:
    p = sub.add_parser("spec", help="write an architecture's merge spec as YAML",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="a checkpoint (file or folder) with config.json next to it")
    p.add_argument("-o", "--output", required=True, help="the YAML file to write")
    p.add_argument("--model", metavar="MODULE:ATTR", help="builds the architecture (instead of a checkpoint)")
    p.add_argument("--model-kwargs", metavar="JSON", help="keyword arguments for --model")
    p.add_argument("--input-shape", help="--model: shape of the example input, e.g. 2,64 or 2,3,32,32")
    p.add_argument("--input-dtype", choices=DTYPES, default="float32", help="--model: dtype of the example input")
    p.add_argument("--check", action="store_true", help="--model: verify the spec on the model (random permutations)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--quiet", action="store_true", help="do not print the spec's summary")
    p.set_defaults(run=run)


def _shape(text: str | None) -> tuple[int, ...]:
    if not text:
        raise InvalidArgumentError("--model needs --input-shape (the example input the model is traced on), e.g. 2,64")
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise InvalidArgumentError(f"--input-shape {text!r}: write integers separated by commas, e.g. 2,3,32,32") from None
    if not shape or any(s <= 0 for s in shape):
        raise InvalidArgumentError(f"--input-shape {text!r}: every size must be positive")
    if math.prod(shape) > MAX_EXAMPLE_ELEMENTS:  # tracing needs a sample or two, not a dataset
        raise InvalidArgumentError(f"--input-shape {text!r}: {math.prod(shape):,} elements; an example input of at "
                                   f"most {MAX_EXAMPLE_ELEMENTS:,} (a batch of 1 or 2) is all tracing needs")
    return shape


def run(args: argparse.Namespace) -> int:
    if bool(args.checkpoint) == bool(args.model):
        raise InvalidArgumentError("give either a checkpoint (with config.json next to it) or --model, not both")
    if os.path.exists(args.output) and not args.overwrite:
        raise CheckpointError(f"{args.output}: exists already; pass --overwrite to replace it")
    if args.checkpoint:
        ckpt = Checkpoint(args.checkpoint)
        spec = spec_from_config(config_folder(args.checkpoint), {k: ckpt.shape(k) for k in ckpt.keys()})
    else:
        try:
            kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
        except json.JSONDecodeError as exc:
            raise InvalidArgumentError(f"--model-kwargs is not valid JSON ({exc})") from None
        model = model_factory(args.model, kwargs)().eval()
        dtype = torch.long if args.input_dtype == "long" else getattr(torch, args.input_dtype)
        shape = _shape(args.input_shape)
        # random values make --check meaningful (zeros would hide most of the network); token ids stay 0
        example = ((torch.zeros(shape, dtype=dtype) if dtype == torch.long else
                    torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)),)
        spec = trace_spec(model, example)
        if args.check:
            check_spec(spec, model, example)  # SpecError (exit 2) when a permutation changes the outputs
    save_spec(spec, args.output)
    if not args.quiet:
        print(spec.summary())
        print(f"wrote {args.output}")
    return 0
