"""The output of a merge, planned from its first input before any work: one tensor per input
tensor (same names, order and shapes; floating tensors in the output dtype when one is asked
for), the merge's provenance in the safetensors metadata, and a ShardedWriter that has already
refused an output that exists or would replace an input."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence

import torch

from .._version import __version__
from .reader import Checkpoint
from .writer import ShardedWriter, parse_size


def merge_metadata(method: str, alignment: str, inputs: Sequence[str], options: Mapping | None = None) -> dict[str, str]:
    """The safetensors metadata of a merged model: fastmerge's version, the method, the alignment,
    the options (when given) and the inputs' file names."""
    metadata = {"format": "pt", "merged_by": f"fastmerge {__version__}", "merge_method": method, "alignment": alignment}
    if options is not None:
        metadata["merge_options"] = json.dumps(dict(options))
    metadata["merge_inputs"] = json.dumps([os.path.basename(os.path.abspath(m)) for m in inputs])
    return metadata


def plan_output(source: Checkpoint, output: str, *, out_dtype: torch.dtype | None = None,
                metadata: Mapping[str, str] | None = None, max_shard_size: str | int | None = "5GB",
                overwrite: bool = False, protected: Iterable[Checkpoint] = (),
                shapes: Mapping[str, tuple] | None = None) -> ShardedWriter:
    """The writer of a merge of checkpoints like `source` into `output` (a .safetensors file or a
    folder for shards of at most `max_shard_size`, e.g. "5GB"). `out_dtype`: the dtype of the
    floating tensors (None: as `source`; other tensors keep theirs). `protected`: the inputs,
    whose files the output must not replace. `shapes`: tensors whose output shape differs from
    the source's (a vocabulary re-indexed to another tokenizer).

    Raises:
        CheckpointError: a bad size, an output that exists (without overwrite) or is an input.
    """

    def target_dtype(name: str) -> torch.dtype:
        dtype = source.dtype(name)
        return out_dtype if out_dtype is not None and dtype.is_floating_point else dtype

    shapes = shapes or {}
    layout = [(name, tuple(shapes.get(name, source.shape(name))), target_dtype(name)) for name in source.keys()]
    return ShardedWriter(output, layout, max_shard_bytes=parse_size(max_shard_size), metadata=dict(metadata or {}),
                         overwrite=overwrite, protected=[f for ckpt in protected for f in ckpt.files()])
