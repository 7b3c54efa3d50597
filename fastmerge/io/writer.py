"""Streaming, sharded, atomic safetensors writes.

The output's tensors (names, shapes, dtypes) are known before any is computed, so every shard's
header is written first and each tensor's bytes are appended the moment it is ready: memory holds
one tensor, never a shard. Everything is written under temporary names in the target folder and
renamed at the end (shards first, the index last), after an fsync; an error, Ctrl-C or SIGTERM
(the CLI turns it into an exception) removes the temporary files, so a crash leaves no output
under the final names. One run at a time writes an output: a lock file next to it (flock, held
from the first write to the last rename, removed after) refuses a second run at its plan, or at
its first write, so two runs with overwrite never interleave their shards.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import struct
from collections.abc import Sequence

import torch

from ..errors import CheckpointError
from .reader import FOLDER_NAMES, INDEX_NAME, SINGLE_NAME, tensor_nbytes
from .writeback import start_writeback

WRITEBACK_BYTES = 64 << 20  # written bytes after which their writeback to disk is started

_DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int | None) -> int | None:
    """'5GB', '500MiB', '1e9' or an int -> bytes (None: no limit)."""
    if text is None or isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in _UNITS:
        raise CheckpointError(f"cannot read the size {text!r}; write e.g. 5GB, 500MiB or a number of bytes")
    try:
        size = float(match.group(1)) * _UNITS[match.group(2).upper()]
    except ValueError:  # "1.2.3", "e5"
        size = math.nan
    if not math.isfinite(size) or not 1 <= size <= 2**62:
        raise CheckpointError(f"the size {text!r} is not a positive number of bytes up to 2^62; write e.g. 5GB")
    return int(size)


def _loaded_from(folder: str, extra: str | None = None) -> str | None:
    """The file that reading the folder as a checkpoint opens (Checkpoint's order of names), as it
    is, or once a file named `extra` is there too; None when none."""
    for name in FOLDER_NAMES:
        if name == extra or os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


class ShardedWriter:
    """Writes the tensors of `plan` ((name, shape, dtype) in writing order) to `output`.

    `output` ending in ``.safetensors`` is one file (the plan must fit one shard); anything else is a
    folder that receives ``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` shards of at
    most `max_shard_bytes` each plus ``model.safetensors.index.json``. Use as a context manager:
    ``write`` each tensor in plan order, and the files appear under their names on a clean exit.
    """

    def __init__(self, output: str, plan: Sequence[tuple[str, Sequence[int], torch.dtype]], *,
                 max_shard_bytes: int | None = None, metadata: dict[str, str] | None = None,
                 overwrite: bool = False, protected: Sequence[str] = ()) -> None:
        output = os.fspath(output)
        self.output = output
        self.plan = [(name, tuple(int(s) for s in shape), dtype) for name, shape, dtype in plan]
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        for name, _, dtype in self.plan:
            if dtype not in _DTYPE_CODES:
                raise CheckpointError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
        self.single_file = output.endswith(".safetensors")
        self.folder = os.path.dirname(os.path.abspath(output)) if self.single_file else os.path.abspath(output)
        self.shards = self._plan_shards(max_shard_bytes)
        if self.single_file and len(self.shards) > 1:
            raise CheckpointError(f"{output}: the merged model needs {len(self.shards)} shards of at most "
                                  f"{max_shard_bytes} bytes; give a folder as the output to write shards")
        self.final_paths = self._final_paths()
        self.lock_path = os.path.join(self.folder, f".{os.path.basename(os.path.abspath(output))}.lock"
                                      if self.single_file else ".fastmerge-output.lock")
        self._check_targets(overwrite, protected)
        self._check_unlocked()
        self._lock_fd: int | None = None
        self.overwrite = overwrite
        self._next = 0
        self._file = None
        self._shard = -1
        self._temps: list[str] = []
        self._published: list[str] = []  # final paths this run has renamed into place
        self._created_folders: list[str] = []  # folders this run made, deepest first

    def _plan_shards(self, limit: int | None) -> list[list[tuple[str, tuple, torch.dtype]]]:
        shards: list[list] = [[]]
        size = 0
        for entry in self.plan:
            nbytes = tensor_nbytes(entry[1], entry[2])
            if limit is not None and shards[-1] and size + nbytes > limit:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += nbytes
        return shards

    def _final_paths(self) -> list[str]:
        if self.single_file:
            return [os.path.abspath(self.output)]
        n = len(self.shards)
        if n == 1:
            return [os.path.join(self.folder, SINGLE_NAME)]
        return [os.path.join(self.folder, f"model-{k + 1:05d}-of-{n:05d}.safetensors") for k in range(n)] + [
            os.path.join(self.folder, INDEX_NAME)]

    def _check_targets(self, overwrite: bool, protected: Sequence[str]) -> None:
        inputs = {os.path.realpath(p) for p in protected}
        if self.output.endswith(".json"):
            raise CheckpointError(f"{self.output}: an output is a .safetensors file or a folder (its index is written "
                                  "inside it); name the file or the folder")
        for path in self.final_paths:
            if os.path.realpath(path) in inputs:
                raise CheckpointError(f"{path}: refusing to write over an input of this merge; choose another output")
            folder = os.path.dirname(os.path.realpath(path))
            loaded = _loaded_from(folder)
            if loaded is not None and loaded in inputs and _loaded_from(folder, extra=os.path.basename(path)) != loaded:
                raise CheckpointError(f"{path}: written there, it would change what loading the folder {folder} (an "
                                      "input of this merge) returns; choose another output")
        if os.path.isdir(self.folder) and any(os.path.realpath(p).startswith(os.path.realpath(self.folder) + os.sep)
                                              for p in inputs) and not self.single_file:
            raise CheckpointError(f"{self.output}: the output folder holds an input of this merge; choose another one")
        if not overwrite:
            existing = [p for p in self.final_paths if os.path.exists(p)]
            if not self.single_file and os.path.isdir(self.folder):  # any model files of an earlier output
                existing += [os.path.join(self.folder, n) for n in sorted(os.listdir(self.folder)) if _is_model_file(n)]
            if existing:
                raise CheckpointError(f"{existing[0]}: exists already; pass overwrite=True to replace it")

    # ------------------------------------------------------------------ the lock
    def _busy(self) -> CheckpointError:
        """The error for an output whose lock another run holds (naming its pid when it wrote one)."""
        try:
            with open(self.lock_path) as f:
                holder = f"process {f.read(20).strip() or '?'}"
        except OSError:
            holder = "another process"
        return CheckpointError(f"{self.output}: another fastmerge run ({holder}) is writing this output now; wait "
                               "for it to finish or choose another output")

    def _check_unlocked(self) -> None:
        """Fails fast, before any work, when another run holds the output's lock (probed, not taken:
        a run that fails before writing leaves no lock file behind)."""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return  # no lock file (or no folder yet): nobody is writing this output
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._busy() from None
        except OSError:
            pass  # a file system without flock: the no-clobber publication still guards the output
        finally:
            os.close(fd)

    def _acquire_lock(self) -> None:
        """Takes the output's lock (the lock file created if needed). A lock file that another run
        removed between our open and our flock is not a lock: then try again on the new one."""
        for _ in range(100):
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as exc:  # a symlink planted there, a read-only folder
                raise CheckpointError(f"{self.lock_path}: cannot take the output's lock ({exc.strerror or exc}); "
                                      "remove that file or choose another output") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._busy() from None
            except OSError:
                pass  # no flock on this file system: the no-clobber publication still guards the output
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.lock_path, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                self._lock_fd = fd
                return
            os.close(fd)
        raise CheckpointError(f"{self.output}: could not take the output's lock {self.lock_path}")

    def _release_lock(self) -> None:
        if self._lock_fd is None:
            return
        try:
            os.unlink(self.lock_path)  # while still held: a waiting run then retries on a new file
        except OSError:
            pass
        os.close(self._lock_fd)
        self._lock_fd = None

    # ------------------------------------------------------------------ writing
    def __enter__(self) -> ShardedWriter:
        missing = []
        folder = self.folder
        while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
            missing.append(folder)
            folder = os.path.dirname(folder)
        try:
            os.makedirs(self.folder, exist_ok=True)
        except OSError as exc:
            raise self._io_error(exc) from None
        self._created_folders = missing  # deepest first: removed in this order after a failure
        try:
            self._acquire_lock()
        except BaseException:
            self._discard()
            raise
        self._remove_dead_temps()
        return self

    def _remove_dead_temps(self) -> None:
        """Temporary files that a killed run (SIGKILL, power loss) left in the output folder: those of
        processes that no longer exist."""
        for name in os.listdir(self.folder):
            match = re.fullmatch(r"\.(.+)\.tmp-(\d+)", name)
            if (match is None or not (match.group(1).endswith(".safetensors") or match.group(1) == INDEX_NAME)
                    or _alive(int(match.group(2)))):
                continue
            try:
                os.remove(os.path.join(self.folder, name))
            except OSError:
                pass  # gone meanwhile, or not ours to remove

    def _io_error(self, exc: OSError) -> CheckpointError:
        """A failed write (disk full, file too large, permissions) as the error the CLI reports in
        one line; the temporary files are removed by __exit__ or _discard."""
        return CheckpointError(f"{self.output}: cannot write the merged model ({exc.strerror or exc}); free space "
                               "on that disk or choose another output (nothing was written)")

    def _discard(self) -> None:
        if self._file is not None:
            try:
                self._file.close()  # flushes the buffer: fails again on a full disk; the file goes anyway
            except OSError:
                pass
            self._file = None
        for path in self._temps + self._published:  # an interrupted publication: its files go too
            if os.path.exists(path):
                os.remove(path)
        self._release_lock()
        for folder in self._created_folders:  # folders this failed run made, deepest first: gone too
            try:
                os.rmdir(folder)
            except OSError:
                break  # not empty: something else is in it

    def _open_shard(self, k: int) -> None:
        entries = self.shards[k]
        header: dict = {"__metadata__": self.metadata} if self.metadata else {}
        offset = 0
        for name, shape, dtype in entries:
            nbytes = tensor_nbytes(shape, dtype)
            header[name] = {"dtype": _DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        temp = os.path.join(self.folder, f".{os.path.basename(self.final_paths[k])}.tmp-{os.getpid()}")
        self._temps.append(temp)
        self._file = open(temp, "wb")
        self._file.write(struct.pack("<Q", len(text)))
        self._file.write(text)
        self._written_back = 0  # [0, _written_back) of this file is on its way to the disk
        self._shard = k
        self._left_in_shard = len(entries)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.plan):
            raise CheckpointError(f"tensor {name!r} is not part of the planned output")
        want_name, want_shape, want_dtype = self.plan[self._next]
        if name != want_name or tuple(tensor.shape) != want_shape or tensor.dtype != want_dtype:
            raise CheckpointError(f"write order: expected {want_name!r} {want_shape} {want_dtype}, got {name!r} "
                                  f"{tuple(tensor.shape)} {tensor.dtype}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        try:
            if self._file is None or self._left_in_shard == 0:
                if self._file is not None:
                    self._finish_file()
                self._open_shard(self._shard + 1)
            if data.numel():
                self._file.write(data.view(torch.uint8).numpy().data)
                self._start_writeback()
        except OSError as exc:
            raise self._io_error(exc) from None
        self._left_in_shard -= 1
        self._next += 1

    def _start_writeback(self) -> None:
        """Every WRITEBACK_BYTES, the disk starts on what was written, while the merge goes on."""
        end = self._file.tell()
        if end - self._written_back >= WRITEBACK_BYTES:
            self._file.flush()
            start_writeback(self._file.fileno(), self._written_back, end - self._written_back)
            self._written_back = end

    def _finish_file(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None

    def __exit__(self, exc_type, exc, tb) -> None:
        incomplete = exc_type is None and self._next != len(self.plan)
        if exc_type is not None or incomplete:
            self._discard()
            if incomplete:
                raise CheckpointError(f"{self.output}: only {self._next} of {len(self.plan)} tensors were written")
            return  # the original exception propagates
        try:
            self._finish()
            self._release_lock()
        except OSError as exc:
            self._discard()
            raise self._io_error(exc) from None
        except BaseException:  # Ctrl-C or SIGTERM during the fsyncs or renames: nothing stays
            self._discard()
            raise

    def _finish(self) -> None:
        """Completes the last shard, writes the index, renames everything into place."""
        if self._file is not None:
            self._finish_file()
        if len(self.plan) == 0:  # an empty model: one shard with a header only
            self._open_shard(0)
            self._finish_file()
        if not self.single_file and len(self.shards) > 1:
            index = {"metadata": {**self.metadata, "total_size": sum(tensor_nbytes(s, d) for _, s, d in self.plan)},
                     "weight_map": {name: os.path.basename(self.final_paths[k])
                                    for k, shard in enumerate(self.shards) for name, _, _ in shard}}
            temp = os.path.join(self.folder, f".{INDEX_NAME}.tmp-{os.getpid()}")
            self._temps.append(temp)
            with open(temp, "w") as f:
                json.dump(index, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
        for temp, final in zip(self._temps, self.final_paths):  # shards first, the index last
            self._publish(temp, final)
        self._remove_stale_shards()
        try:  # make the renames durable
            fd = os.open(self.folder, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        except OSError:
            pass

    def _publish(self, temp: str, final: str) -> None:
        """Renames `temp` to `final`; without overwrite, never over a file that appeared since the
        plan was checked (another run writing the same output): a hard link fails on an existing
        name where a rename would replace it."""
        if self.overwrite:
            os.replace(temp, final)
        else:
            try:
                os.link(temp, final)
            except FileExistsError:
                raise CheckpointError(f"{final}: appeared while this merge ran (another run writing the same "
                                      "output?); nothing of this run was kept; pass overwrite=True to replace "
                                      "it") from None
            except OSError:  # a file system without hard links: the check and the rename, as close as they get
                if os.path.exists(final):
                    raise CheckpointError(f"{final}: appeared while this merge ran; pass overwrite=True to replace "
                                          "it") from None
                os.replace(temp, final)
            else:
                os.unlink(temp)
        self._published.append(final)

    def _remove_stale_shards(self) -> None:
        """After replacing a sharded output: shards of the previous version that are not ours."""
        if self.single_file:
            return
        keep = {os.path.basename(p) for p in self.final_paths}
        for name in os.listdir(self.folder):
            if _is_model_file(name) and name not in keep:
                os.remove(os.path.join(self.folder, name))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _is_model_file(name: str) -> bool:
    return bool(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name)) or name in (SINGLE_NAME, INDEX_NAME)
