"""Checkpoint files: lazy reads of safetensors (single or sharded) and weights-only torch files,
streaming sharded safetensors writes with atomic renames."""

from .reader import Checkpoint, tensor_nbytes
from .writer import ShardedWriter, parse_size

__all__ = ["Checkpoint", "ShardedWriter", "parse_size", "tensor_nbytes"]
