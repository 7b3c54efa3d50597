"""Lazy, tensor-at-a-time reads of model checkpoints.

Formats: a ``.safetensors`` file, a folder holding ``model.safetensors`` or a sharded
``model.safetensors.index.json`` (or the index file itself), and torch ``.pt`` / ``.bin`` state
dicts, single or sharded (``pytorch_model.bin.index.json``, as older Hugging Face models ship),
which are opened with ``weights_only=True`` and memory-mapped (a pickle that wants to run code is
refused, never executed). A safetensors tensor is a private memory map of its own bytes
(no copy: the pages of the page cache), unmapped when the tensor is freed, so memory stays bounded
by the tensors in flight.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import pickle
import re
import struct
import sys
import warnings
import weakref
from collections.abc import Iterator, Mapping

import torch

from ..errors import CheckpointError
from .lora import LoraAdapter, split_reference
from .torch_zip import check_storage_records

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
TORCH_NAMES = ("pytorch_model.bin", "model.pt", "model.bin")
TORCH_INDEX_NAME = "pytorch_model.bin.index.json"
# what a folder is read from, in this order (safetensors first, as transformers and mergekit do)
FOLDER_NAMES = (INDEX_NAME, SINGLE_NAME, TORCH_INDEX_NAME, *TORCH_NAMES)


class Checkpoint(Mapping[str, torch.Tensor]):
    """A read-only view of one checkpoint: names, shapes and dtypes without reading data, and one
    tensor at a time on request (``checkpoint[name]``).

    A read-on-access state dict (a Mapping of tensor name -> tensor): code that takes a state
    dict, weight matching for one, reads each tensor when it needs it, so memory holds a few
    tensors, not the model. Unlike a dict, a missing name raises CheckpointError (naming the
    file), and two checkpoints are equal only when they are the same object (comparing them would
    read every tensor)."""

    def __init__(self, path: str | os.PathLike) -> None:
        path = os.fspath(path)
        self.path = path
        self._files: dict[str, str] = {}  # tensor name -> file that holds it
        self._handles: dict[str, object] = {}
        self._torch_state: dict[str, torch.Tensor] = {}  # the tensors of torch files (memory maps)
        self.metadata: dict[str, str] = {}
        self._lora = None
        self._index: str | None = None  # the index file a sharded checkpoint was opened from
        reference = split_reference(path)  # mergekit's model+lora: the adapter merged in on read
        self._open(reference[0] if reference else path)
        if reference:
            self._lora = LoraAdapter(reference[1], self._files, Checkpoint)

    # ------------------------------------------------------------------ opening
    def _open(self, path: str) -> None:
        if not os.path.exists(path):
            raise CheckpointError(f"{path}: no such file or folder")
        if not os.path.isdir(path) and not os.path.isfile(path):  # reading a FIFO or a device could block forever
            raise CheckpointError(f"{path}: not a regular file (a pipe, socket or device); give a checkpoint file")
        if os.path.isdir(path):
            for name in FOLDER_NAMES:
                candidate = os.path.join(path, name)
                if os.path.exists(candidate):
                    return self._open(candidate)
            raise CheckpointError(f"{path}: a folder without {INDEX_NAME}, {SINGLE_NAME}, {TORCH_INDEX_NAME} or a "
                                  "torch state dict")
        if path.endswith(".index.json"):
            self._open_index(path)
        elif path.endswith(".safetensors"):
            self._open_safetensors(path)
        elif path.endswith((".pt", ".bin", ".pth")):
            self._open_torch(path)
        else:
            raise CheckpointError(f"{path}: unknown checkpoint format (use .safetensors, an index.json, .pt or .bin)")

    def _open_index(self, path: str) -> None:
        self._index = path
        try:
            with open(path) as f:
                index = json.load(f, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                           for k, v in weight_map.items()):
                raise ValueError("'weight_map' must map tensor names to shard file names")
            if not isinstance(index.get("metadata") or {}, dict):
                raise ValueError("'metadata' must be a JSON object")
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            raise CheckpointError(f"{path}: not a valid checkpoint index ({str(exc)[:160]}); expected a JSON object "
                                  "with a 'weight_map' of tensor name -> shard file") from None
        folder = os.path.dirname(path)
        for shard in sorted(set(weight_map.values())):
            shard_path = os.path.join(folder, shard)
            if os.path.basename(shard) != shard or not os.path.isfile(shard_path):
                raise CheckpointError(f"{path}: shard {shard!r} named by the index is missing from {folder}")
            if shard.endswith((".bin", ".pt", ".pth")):
                self._open_torch(shard_path)
            else:
                self._open_safetensors(shard_path)
        missing = set(weight_map) - set(self._files)
        if missing:
            raise CheckpointError(f"{path}: the index names {len(missing)} tensor(s) its shards do not hold, "
                                  f"e.g. {sorted(missing)[:3]}")
        # an index that disagrees with its shards is corrupt: loaders differ on which of the two
        # they follow (the weight_map, or every tensor of every shard it names), so what we merged
        # could differ from what a user's loader returns
        for name, shard_path in self._files.items():
            if name not in weight_map:
                raise CheckpointError(f"{path}: shard {os.path.basename(shard_path)} holds tensor {name!r}, which "
                                      "the index does not list; regenerate the index from the shards")
            if weight_map[name] != os.path.basename(shard_path):
                raise CheckpointError(f"{path}: the index puts tensor {name!r} in {weight_map[name]} but it is in "
                                      f"{os.path.basename(shard_path)}; regenerate the index from the shards")
        self.metadata.update(index.get("metadata") or {})

    def _open_safetensors(self, path: str) -> None:
        header = SafetensorsFile(path)
        self._handles[path] = header
        self.metadata.update(header.metadata)
        for name in header.entries:
            if name in self._files:
                raise CheckpointError(f"{path}: tensor {name!r} is also in {self._files[name]}")
            self._files[name] = path

    def _open_torch(self, path: str) -> None:
        check_storage_records(path)  # before the memory map trusts the pickle's sizes
        try:
            with warnings.catch_warnings():  # torch's note on a legacy pickle protocol: the error below says more
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                try:  # memory-mapped when the file is a zip archive (torch.save's format since 1.6)
                    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as exc:
                    if "mmap" not in str(exc):
                        raise
                    state = torch.load(path, map_location="cpu", weights_only=True)  # a legacy file
        except pickle.UnpicklingError as exc:
            # torch's message runs over many lines and advises loading with weights_only=False or
            # allow-listing the global: unsafe advice for a file that wants to run code. Only what
            # was refused is passed on.
            found = re.search(r"(?i)unsupported[^.\n]*?(global\s+[\w.]+)", str(exc))
            detail = f"unsupported {found.group(1)}" if found else "a pickled object fastmerge does not load"
            raise CheckpointError(
                f"{path}: refused: the file holds pickled objects other than tensors ({detail}). fastmerge loads torch "
                "files with weights_only=True and never runs code from a checkpoint; convert it to safetensors "
                "where you trust it") from None
        except Exception as exc:  # noqa: BLE001 - a legacy pickle of junk fails with any type (KeyError, struct.error, ...)
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {str(exc)[:160]}); "
                                  "expected a file written by torch.save") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path}: expected a state dict of tensors")
        odd = next((k for k, v in state.items() if v.layout != torch.strided or v.is_quantized), None)
        if odd is not None:
            kind = "quantised" if state[odd].is_quantized else f"{state[odd].layout} (not dense)"
            raise CheckpointError(f"{path}: tensor {odd!r} is {kind}; fastmerge merges dense tensors: save them "
                                  "dense (tensor.to_dense(), tensor.dequantize()) first")
        for name, tensor in state.items():
            if name in self._files:
                raise CheckpointError(f"{path}: tensor {name!r} is also in {self._files[name]}")
            self._files[name] = path
            self._torch_state[name] = tensor

    # ------------------------------------------------------------------ reading
    def keys(self) -> list[str]:  # a list, as before Checkpoint was a Mapping (not a view)
        return list(self._files)

    def __contains__(self, name: object) -> bool:
        return name in self._files

    def get(self, name: str, default=None):
        return self.read(name) if name in self._files else default

    __eq__ = object.__eq__  # identity: Mapping's would read and compare every tensor
    __hash__ = object.__hash__

    def __len__(self) -> int:
        return len(self._files)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def _entry(self, name: str):
        if name not in self._files:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        return self._handles[self._files[name]].entries[name]

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._torch_state:
            return tuple(self._torch_state[name].shape)
        return self._entry(name)[1]

    def dtype(self, name: str) -> torch.dtype:
        if name in self._torch_state:
            return self._torch_state[name].dtype
        return self._entry(name)[0]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.read(name)

    def read(self, name: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """One tensor; safetensors data goes into `buffer` (uint8, reused by the caller) when given."""
        if name in self._torch_state:
            tensor = self._torch_state[name]
        else:
            self._entry(name)
            tensor = self._handles[self._files[name]].read(name, buffer)
        return self._lora.apply(name, tensor) if self._lora is not None and name in self._lora else tensor

    def tensor_bytes(self, name: str) -> int:
        return tensor_nbytes(self.shape(name), self.dtype(name))

    def files(self) -> list[str]:
        """Every file this checkpoint reads (shards and index), e.g. to refuse writing over one."""
        found = set(self._files.values()) | set(self._lora.files() if self._lora is not None else [])
        if self._index is not None:
            found.add(self._index)
        return sorted(os.path.abspath(f) for f in found)

    def nbytes(self) -> int:
        return sum(self.tensor_bytes(name) for name in self._files)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


MAX_HEADER_BYTES = 100 * 2**20


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number a tensor header can hold")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose keys are unique: json's default keeps the last of a repeated key, so two
    readers of one file could disagree on which tensor (or shard) a name means."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        repeated = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"the key {repeated!r} appears more than once")
    return out


_MAX_INDEX = 2**62  # dimensions and byte offsets beyond this describe no file that exists


def _index(value, what: str) -> int:
    """A header's dimension or offset: a JSON integer in [0, 2^62] (not a float, bool or string)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_INDEX:
        raise ValueError(f"{what} must be an integer in [0, 2^62], got {value!r}")
    return value


class SafetensorsFile:
    """The header of one safetensors file, validated before anything is read (an untrusted file
    cannot make us read outside it or trust overlapping tensors), and tensor reads.

    A tensor is a copy-on-write map of its bytes alone (reading it copies nothing; writing to it
    leaves the file alone), unmapped when the tensor is freed: one map of the whole file would
    hold every page it touched in the process's resident memory until it was closed. A tensor
    whose bytes are not aligned to its dtype (safetensors does not promise it) is read into
    memory instead, as the vectorised kernels expect aligned elements."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER_BYTES or 8 + n > size:
                    raise CheckpointError(f"{path}: corrupt safetensors header (declares {n} bytes, the file has {size})")
                raw = f.read(n)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read ({exc})") from None
        try:
            header = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: brackets nested too deep
            raise CheckpointError(f"{path}: corrupt safetensors header (not JSON a reader can use: "
                                  f"{type(exc).__name__}: {str(exc)[:120]})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
        self.metadata = meta
        self.data_start = 8 + n
        data_size = size - self.data_start
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        spans = []
        for name, info in header.items():
            try:
                dtype = _SAFETENSORS_DTYPES[info["dtype"]]
                if not isinstance(info["shape"], list) or len(info["data_offsets"]) != 2:
                    raise ValueError("malformed shape or data_offsets")
                shape = tuple(_index(s, "a dimension") for s in info["shape"])
                begin, end = (_index(x, "an offset") for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r} ({exc})") from None
            if not 0 <= begin <= end <= data_size or end - begin != tensor_nbytes(shape, dtype):
                raise CheckpointError(f"{path}: tensor {name!r} has offsets [{begin}, {end}] that do not fit its "
                                      f"shape {shape} {dtype} or the file ({data_size} data bytes); the file is corrupt")
            self.entries[name] = (dtype, shape, begin, end)
            spans.append((begin, end, name))
        # empty tensors occupy no bytes: leaving them out, no tensor may begin before the end of any
        # earlier one (comparing neighbours alone would let an empty span hide an overlap)
        furthest = (0, None)
        for begin, end, name in sorted(s for s in spans if s[1] > s[0]):
            if furthest[1] is not None and begin < furthest[0]:
                raise CheckpointError(f"{path}: tensors {furthest[1]!r} and {name!r} overlap in the file; it is corrupt")
            furthest = max(furthest, (end, name), key=lambda f: f[0])

    def read(self, name: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor: a map of the file's bytes, or, where they are not aligned to the dtype, read
        into `buffer` (a uint8 tensor of at least its size, reused across calls to skip the page
        faults of fresh memory) or into new memory."""
        dtype, shape, begin, end = self.entries[name]
        start = self.data_start + begin
        if end > begin and start % dtype.itemsize == 0:
            return self._map(name, start, end - begin).view(dtype).reshape(shape)
        if buffer is None or buffer.numel() < end - begin:
            buffer = torch.empty(end - begin, dtype=torch.uint8)
        buffer = buffer[: end - begin]
        if end > begin:
            with open(self.path, "rb") as f:
                f.seek(start)
                got = f.readinto(buffer.numpy())
            if got != end - begin:
                raise CheckpointError(f"{self.path}: tensor {name!r} is cut short (file truncated)")
        return buffer.view(dtype).reshape(shape)

    def _map(self, name: str, start: int, nbytes: int) -> torch.Tensor:
        """[start, start + nbytes) of the file as a uint8 tensor over a private map."""
        offset = start - start % mmap.ALLOCATIONGRANULARITY
        try:
            with open(self.path, "rb") as f:
                mapped = mmap.mmap(f.fileno(), start + nbytes - offset, access=mmap.ACCESS_COPY, offset=offset)
        except ValueError:  # the map would end past the end of the file
            raise CheckpointError(f"{self.path}: tensor {name!r} is cut short (file truncated)") from None
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot read tensor {name!r} ({exc})") from None
        _populate(mapped)
        tensor = torch.frombuffer(mapped, dtype=torch.uint8, count=nbytes, offset=start - offset)
        _register_map(tensor, mapped)
        return tensor


_MADV_POPULATE_READ = 22  # Linux 5.14+; not in Python 3.11's mmap module

# The tensors SafetensorsFile maps (one map each), by the address of their first byte: their map,
# weakly. No finaliser removes an entry (Python code run at a collection can swallow the
# KeyboardInterrupt that SIGTERM raises): a dead entry is inert (its map is gone), a new map at the
# same address replaces it, and the dead ones are swept when the table grows.
_MAPS: dict[int, weakref.ref] = {}
_MAPS_SWEEP = 4096


def _register_map(tensor: torch.Tensor, mapped: mmap.mmap) -> None:
    if len(_MAPS) >= _MAPS_SWEEP:
        for address in [a for a, ref in _MAPS.items() if ref() is None]:
            del _MAPS[address]
    _MAPS[tensor.data_ptr()] = weakref.ref(mapped)


def release_pages(tensor: torch.Tensor) -> bool:
    """Drops the pages of a tensor that a checkpoint read through a map (Checkpoint.read) from this
    process's memory, keeping the tensor valid: its map is private to it and never written, so a
    later access reads the same bytes again from the page cache. Methods that hold their own copy
    of an input (task vectors) call it once they are done with the input, so the inputs' maps stop
    counting in a merge's memory. Never on a tensor that was written to (the writes would be
    dropped; fastmerge never writes its inputs). Anything else (a tensor in ordinary memory, a view
    starting elsewhere, a system without MADV_DONTNEED) is left alone; returns whether pages were
    dropped."""
    ref = _MAPS.get(tensor.data_ptr()) if tensor.device.type == "cpu" else None
    mapped = ref() if ref is not None else None
    if mapped is None or not hasattr(mmap, "MADV_DONTNEED"):
        return False
    try:
        mapped.madvise(mmap.MADV_DONTNEED)
    except (OSError, ValueError):
        return False
    return True


def _populate(mapped: mmap.mmap) -> None:
    """Maps a tensor's pages in one call, reading them from disk if the page cache lacks them:
    measured faster than a page fault per 64 KiB on page-cached files, and faster than faults'
    small read-aheads on cold ones. MADV_POPULATE_READ maps them without copying (populating a
    writable private map would copy every page); older kernels: read-ahead (MADV_WILLNEED)."""
    if sys.platform.startswith("linux"):
        try:
            mapped.madvise(_MADV_POPULATE_READ)
            return
        except OSError:
            pass
    if hasattr(mmap, "MADV_WILLNEED"):
        mapped.madvise(mmap.MADV_WILLNEED)


def tensor_nbytes(shape, dtype: torch.dtype) -> int:
    """Bytes of a dense tensor of this shape and dtype."""
    return math.prod(int(s) for s in shape) * dtype.itemsize
