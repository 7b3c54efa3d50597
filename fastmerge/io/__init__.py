"""Checkpoint files: lazy reads of safetensors (single or sharded) and weights-only torch files,
streaming sharded safetensors writes with atomic renames."""

from .reader import Checkpoint, open_checkpoint
from .writer import ShardedWriter, parse_size

__all__ = ["Checkpoint", "ShardedWriter", "open_checkpoint", "parse_size"]
