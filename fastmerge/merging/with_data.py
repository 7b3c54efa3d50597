"""Activation-based merges of checkpoint files: the architecture comes from Python (a factory that
builds the nn.Module), the weights from the files, and the alignment from a pass over data.

This is what `fastmerge merge --align cca --model ... --data ...` runs. Under torchrun (or any
initialised torch.distributed group) every rank loads the models, passes its shard of the data
(every world_size-th batch), the statistics are reduced exactly across ranks, rank 0 computes the
alignment and broadcasts it, and rank 0 alone writes the output: one merged model, the same as one
process on all the batches would produce.

Checkpoint files themselves are never executed (safetensors, or torch files with
weights_only=True); `build_model` and `data` are Python objects the caller made (the CLI resolves
its --model / --data references in fastmerge.cli.references).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from .. import distributed
from ..alignment import METHODS as ALIGNMENT_METHODS
from ..errors import CheckpointError, InvalidArgumentError
from ..io import Checkpoint, load_models, merge_metadata, parse_dtype, plan_output
from ..io.hf_folder import CONFIG_NAME, copied_files, model_card, read_config, source_folder, write_folder_files
from ..stages import stage
from .api import merge
from .checkpoints import check_output_finite

COMBINATIONS = ("average", "np_merge")


def activation_alignments() -> tuple[str, ...]:
    """What `align` takes: a registered alignment method, or "none" (a plain average)."""
    return (*ALIGNMENT_METHODS, "none")


def merge_files_with_data(models: Sequence[str], output: str, *, build_model: Callable[[], nn.Module],
                          data: Iterable, align: str = "cca", method: str = "average",
                          weights: Sequence[float] | None = None, repair_mode: str = "auto",
                          val_data: Iterable | None = None, np_options: dict | None = None,
                          align_options: dict | None = None, dtype: str | None = None,
                          max_shard_size: str | int | None = "5GB", overwrite: bool = False, device: str = "cpu",
                          progress: bool = True, allow_nonfinite: bool = False, copy_tokenizer: bool = True,
                          write_card: bool = True) -> list[str]:
    """Aligns the checkpoints `models` on `data` and writes their merge to `output`.

    Args:
        models: checkpoint paths (safetensors files or folders, torch .pt/.bin), two or more.
        output: a .safetensors file or a folder (shards + index).
        build_model: builds the architecture (an untrained nn.Module whose state_dict names match the files).
        data: batches for the statistics, BatchNorm reset / REPAIR and (np_merge) training; under
            torch.distributed each rank uses its every world_size-th batch.
        align: an alignment method of fastmerge.alignment.METHODS, or "none".
        method: "average" (weighted by `weights`) or "np_merge" (data must yield (inputs, targets)).
        repair_mode, val_data, np_options, align_options: as in fastmerge.merge.
        dtype: dtype of the written floating tensors (default: as the first input).
        allow_nonfinite: write NaN/Inf merged values (refused by default, before anything is renamed
            into place).
        copy_tokenizer, write_card: a folder output of Hugging Face folders gets config.json, the
            generation config, the first model's tokenizer files and a model card (README.md).

    Returns:
        The files written (on every rank; only rank 0 writes them).
    """
    if align not in activation_alignments():
        raise InvalidArgumentError(f"unknown alignment {align!r}; choose one of {activation_alignments()}")
    if method not in COMBINATIONS:
        raise InvalidArgumentError(f"method={method!r} does not apply to an aligned merge; use one of {COMBINATIONS}")
    out_dtype = parse_dtype(dtype)
    if len(models) < 2:
        raise InvalidArgumentError(f"merging needs at least two checkpoints, got {len(models)}")
    inputs = [Checkpoint(p) for p in models]
    # planned (and the output checked) on every rank before any work, so a bad output path fails fast
    writer = plan_output(inputs[0], output, out_dtype=out_dtype, metadata=merge_metadata(method, align, models),
                         max_shard_size=max_shard_size, overwrite=overwrite, protected=inputs)
    # a folder output of Hugging Face folders becomes a model folder too (config, tokenizer, card)
    source = None if writer.single_file else source_folder(models[0])
    extras = [] if source is None else [os.path.join(writer.folder, n) for n in (
        CONFIG_NAME, *(["README.md"] if write_card else []), *(n for _, n in copied_files(source, copy_tokenizer)))]
    existing = [p for p in extras if os.path.exists(p)]
    if existing and not overwrite:
        raise CheckpointError(f"{existing[0]}: exists already; pass overwrite=True to replace it")
    config = read_config(source) if source is not None else None
    loaded = load_models(models, build_model, distributed.rank_device(device))
    shard = distributed.shard(data)
    if method == "np_merge":
        merged = merge(loaded, "np_merge", align_method="average" if align == "none" else align, data=shard,
                       val_data=distributed.shard(val_data) if val_data is not None else None,
                       np_options=np_options,
                       progress=progress and distributed.rank() == 0, **(align_options or {}))
    else:
        merged = merge(loaded, "average" if align == "none" else align, data=shard, weights=weights,
                       repair_mode=repair_mode, progress=progress and distributed.rank() == 0,
                       **(align_options or {}))
    state = merged.state_dict()
    if distributed.rank() == 0:
        with stage("write"), writer:
            for name, _, target in writer.plan:
                tensor = state[name].detach().to("cpu", target).contiguous()
                if target.is_floating_point and not allow_nonfinite:  # nothing non-finite is renamed into place
                    narrowing = torch.finfo(target).max < torch.finfo(state[name].dtype).max
                    check_output_finite(name, tensor, target, narrowing=narrowing)
                writer.write(name, tensor)
        if source is not None:
            card = model_card(models, f"{align} alignment, {method}", {"weights": list(weights) if weights else None,
                                                                      "repair": repair_mode}, None)
            write_folder_files(writer.folder, source, config, dtype=out_dtype, copy_tokenizer=copy_tokenizer,
                               card=card if write_card else None)
    if distributed.active():
        torch.distributed.barrier()  # the files exist for every rank when this returns
    return writer.final_paths
