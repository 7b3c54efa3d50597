"""Checkpoint files: lazy reads of safetensors (single or sharded) and weights-only torch files,
streaming sharded safetensors writes with atomic renames, and the planning of a merge's output."""

from .dtypes import DTYPES, parse_dtype
from .models import load_models
from .output import merge_metadata, plan_output
from .reader import Checkpoint, tensor_nbytes
from .writer import ShardedWriter, parse_size

__all__ = ["DTYPES", "Checkpoint", "ShardedWriter", "load_models", "merge_metadata", "parse_dtype", "parse_size", "plan_output",
           "tensor_nbytes"]
