"""Activation-based merges of checkpoint files: the architecture comes from Python (a factory that
builds the nn.Module), the weights from the files, and the alignment from a pass over data.

This is what `fastmerge merge --align cca --model ... --data ...` runs. Under torchrun (or any
initialised torch.distributed group) every rank loads the models, passes its shard of the data
(every world_size-th batch), the statistics are reduced exactly across ranks, rank 0 computes the
alignment and broadcasts it, and rank 0 alone writes the output: one merged model, the same as one
process on all the batches would produce.

References `module:attribute` (or `path/to/file.py:attribute`) name Python objects: the attribute is
called without arguments when it is callable (keyword arguments for the model factory can be given
as JSON). Loading them runs that code, as any training script would; checkpoint files themselves
are never executed (safetensors, or torch files with weights_only=True).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from .. import distributed
from ..errors import CheckpointError, InvalidArgumentError, ShapeMismatchError
from ..io import Checkpoint, merge_metadata, parse_dtype, plan_output

ACTIVATION_ALIGNMENTS = ("permute", "cca", "zipit", "weight_matching", "none")
COMBINATIONS = ("average", "np_merge")
# real datasets bundled with dependencies (fastmerge.demo's splits): the fit split, or the
# validation split with the ":val" suffix; batches of (inputs, labels)
BUILTIN_DATA = ("digits", "mnist5k")


def resolve(reference: str, what: str):
    """The object `reference` ("package.module:attr" or "file.py:attr") names."""
    module_name, sep, attr = reference.rpartition(":")
    if not sep or not module_name or not attr:
        raise InvalidArgumentError(f"{what} {reference!r}: write it as module:attribute (e.g. mypkg.models:build) "
                                   "or path/to/file.py:attribute")
    try:
        if module_name.endswith(".py"):
            if not os.path.isfile(module_name):
                raise InvalidArgumentError(f"{what} {reference!r}: no file {module_name}")
            spec = importlib.util.spec_from_file_location(os.path.basename(module_name)[:-3], module_name)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidArgumentError(f"{what} {reference!r}: cannot import {module_name} ({exc})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise InvalidArgumentError(f"{what} {reference!r}: {module_name} has no attribute {attr!r}") from None


def model_factory(reference: str, kwargs: dict | None = None) -> Callable[[], nn.Module]:
    target = resolve(reference, "--model")
    if not callable(target):
        raise InvalidArgumentError(f"--model {reference!r} is not callable; name a class or a function that builds "
                                   "the model")

    def build() -> nn.Module:
        try:
            model = target(**(kwargs or {}))
        except TypeError as exc:  # the arguments do not fit the factory's signature
            raise InvalidArgumentError(f"--model {reference!r} could not be called with --model-kwargs "
                                       f"{kwargs or {}} ({exc})") from None
        if not isinstance(model, nn.Module):
            raise InvalidArgumentError(f"--model {reference!r} returned {type(model).__name__}, not a torch.nn.Module")
        return model

    return build


def data_from(reference: str, batch_size: int = 256) -> Iterable:
    """Batches named by `reference`: a built-in dataset ("digits", "mnist5k", with ":val" for the
    validation split) or a module:attribute that is (or returns) an iterable of batches."""
    name, _, split = reference.partition(":")
    if name in BUILTIN_DATA and split in ("", "fit", "val"):
        from ..demo import load_dataset

        data = load_dataset(name)
        x, y = (data.x_val, data.y_val) if split == "val" else (data.x_fit, data.y_fit)
        return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    target = resolve(reference, "--data")
    batches = target() if callable(target) else target
    if not isinstance(batches, Iterable):
        raise InvalidArgumentError(f"--data {reference!r} gave {type(batches).__name__}, not an iterable of batches")
    return batches


def load_models(paths: Sequence[str], build: Callable[[], nn.Module], device: torch.device) -> list[nn.Module]:
    """Builds one model per checkpoint and loads its weights (every tensor of the model must be in
    the file, with its shape); eval mode, on `device`."""
    models = []
    for path in paths:
        ckpt = Checkpoint(path)
        model = build()
        expected = model.state_dict()
        missing = sorted(set(expected) - set(ckpt.keys()))
        unexpected = sorted(set(ckpt.keys()) - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"{path} does not fit the --model architecture: missing {len(missing)} "
                                  f"{missing[:3]}, unexpected {len(unexpected)} {unexpected[:3]}; check --model and "
                                  "--model-kwargs")
        for name, tensor in expected.items():
            if tuple(ckpt.shape(name)) != tuple(tensor.shape):
                raise ShapeMismatchError(f"{path}: tensor {name!r} has shape {tuple(ckpt.shape(name))}, the --model "
                                         f"architecture {tuple(tensor.shape)}; check --model-kwargs")
        model.load_state_dict({name: ckpt[name] for name in expected})
        models.append(model.to(device).eval())
    return models


def merge_files_with_data(models: Sequence[str], output: str, *, build_model: Callable[[], nn.Module],
                          data: Iterable, align: str = "cca", method: str = "average",
                          weights: Sequence[float] | None = None, repair_mode: str = "auto",
                          val_data: Iterable | None = None, np_options: dict | None = None,
                          align_options: dict | None = None, dtype: str | None = None,
                          max_shard_size: str | int | None = "5GB", overwrite: bool = False, device: str = "cpu",
                          progress: bool = True) -> list[str]:
    """Aligns the checkpoints `models` on `data` and writes their merge to `output`.

    Args:
        models: checkpoint paths (safetensors files or folders, torch .pt/.bin), two or more.
        output: a .safetensors file or a folder (shards + index).
        build_model: builds the architecture (an untrained nn.Module whose state_dict names match the files).
        data: batches for the statistics, BatchNorm reset / REPAIR and (np_merge) training; under
            torch.distributed each rank uses its every world_size-th batch.
        align: an alignment of fastmerge.align ("permute", "cca", "zipit", "weight_matching") or "none".
        method: "average" (weighted by `weights`) or "np_merge" (data must yield (inputs, targets)).
        repair_mode, val_data, np_options, align_options: as in fastmerge.merge.
        dtype: dtype of the written floating tensors (default: as the first input).

    Returns:
        The files written (on every rank; only rank 0 writes them).
    """
    from . import merge

    if align not in ACTIVATION_ALIGNMENTS:
        raise InvalidArgumentError(f"unknown alignment {align!r}; choose one of {ACTIVATION_ALIGNMENTS}")
    if method not in COMBINATIONS:
        raise InvalidArgumentError(f"--method {method!r} does not apply to an aligned merge; use one of {COMBINATIONS}")
    out_dtype = parse_dtype(dtype)
    if len(models) < 2:
        raise InvalidArgumentError(f"merging needs at least two checkpoints, got {len(models)}")
    inputs = [Checkpoint(p) for p in models]
    # planned (and the output checked) on every rank before any work, so a bad output path fails fast
    writer = plan_output(inputs[0], output, out_dtype=out_dtype, metadata=merge_metadata(method, align, models),
                         max_shard_size=max_shard_size, overwrite=overwrite, protected=inputs)
    loaded = load_models(models, build_model, distributed.rank_device(device))
    shard = distributed.shard(data)
    if method == "np_merge":
        merged = merge(loaded, "np_merge", align="average" if align == "none" else align, data=shard,
                       val_data=distributed.shard(val_data) if val_data is not None else None,
                       np_options=np_options,
                       progress=progress and distributed.rank() == 0, **(align_options or {}))
    else:
        merged = merge(loaded, "average" if align == "none" else align, data=shard, weights=weights,
                       repair_mode=repair_mode, progress=progress and distributed.rank() == 0,
                       **(align_options or {}))
    state = merged.state_dict()
    if distributed.rank() == 0:
        with writer:
            for name, _, target in writer.plan:
                writer.write(name, state[name].detach().to("cpu", target).contiguous())
    if distributed.active():
        torch.distributed.barrier()  # the files exist for every rank when this returns
    return writer.final_paths
