"""The storage records of a torch zip checkpoint (torch.save's format since 1.6) checked against
what its pickle claims, before the file is memory-mapped.

torch.load(mmap=True) trusts the byte count that the pickle gives each storage: a record shorter
than its storage is not refused (the load without mmap does refuse it), and the tensor then reads
the bytes of whatever follows in the file: a silently wrong model. Here the pickle is read with an
unpickler that resolves every global to an inert placeholder (nothing from the file runs, whatever
it names), only to collect each storage's (record key, element type, element count), and each is
compared with its record's size in the zip directory.
"""

from __future__ import annotations

import pickle
import warnings
import zipfile

import torch

from ..errors import CheckpointError


class _Placeholder:
    """Whatever the pickle builds: calling, indexing or setting state on it does nothing."""

    def __init__(self, name: str = "") -> None:
        self.name = name

    def __call__(self, *args, **kwargs) -> _Placeholder:
        return _Placeholder()

    def __setstate__(self, state) -> None:
        pass

    def __setitem__(self, key, value) -> None:
        pass

    def append(self, value) -> None:
        pass

    def extend(self, values) -> None:
        pass


class _StorageLister(pickle.Unpickler):
    def __init__(self, file) -> None:
        super().__init__(file)
        self.storages: list[tuple[str, str, int]] = []  # (record key, storage class name, element count)

    def find_class(self, module: str, name: str) -> _Placeholder:
        return _Placeholder(f"{module}.{name}")

    def persistent_load(self, pid) -> _Placeholder:
        if isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage":
            _, kind, key, _, numel = pid
            self.storages.append((str(key), getattr(kind, "name", ""), numel))
        return _Placeholder()


def _element_size(storage_class: str) -> int | None:
    """Bytes per element of a storage named like "torch.FloatStorage"; 1 for UntypedStorage; None
    when the name is not a torch storage class."""
    module, _, name = storage_class.rpartition(".")
    if module != "torch" or not name.endswith("Storage"):
        return None
    if name == "UntypedStorage":
        return 1
    kind = getattr(torch, name, None)
    try:
        with warnings.catch_warnings():  # the legacy storage classes warn that TypedStorage is deprecated
            warnings.simplefilter("ignore")
            return torch.empty((), dtype=kind.dtype).element_size()
    except (AttributeError, TypeError, RuntimeError):
        return None


def check_storage_records(path: str) -> None:
    """Refuses a torch zip checkpoint whose pickle claims storages that its records cannot hold.
    Not a zip archive (a legacy torch file): nothing to check (it is not memory-mapped).

    Raises:
        CheckpointError: a storage without its record, of an unknown type, or larger or smaller than
            its record.
    """
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            records = {info.filename: info for info in archive.infolist()}
            pickles = [name for name in records if name.endswith("/data.pkl") and name.count("/") == 1]
            if len(pickles) != 1:
                raise CheckpointError(f"{path}: a zip archive, but not one torch.save wrote (no single */data.pkl)")
            prefix = pickles[0][: -len("data.pkl")]
            with archive.open(pickles[0]) as f:
                lister = _StorageLister(f)
                lister.load()
    except CheckpointError:
        raise
    except Exception as exc:  # a corrupt archive or pickle: whatever zipfile or pickle raise
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from None
    for key, kind, numel in lister.storages:
        size = _element_size(kind)
        if size is None or not isinstance(numel, int) or numel < 0:
            raise CheckpointError(f"{path}: storage {key!r} has an unknown type or size ({kind}, {numel!r}); not a "
                                  "state dict torch.save wrote")
        record = records.get(f"{prefix}data/{key}")
        if record is None:
            raise CheckpointError(f"{path}: storage {key!r} has no record in the archive; the file is incomplete")
        if record.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{path}: storage {key!r} is compressed; torch.save writes storages uncompressed")
        if record.file_size != numel * size:
            raise CheckpointError(f"{path}: storage {key!r} claims {numel * size} bytes but its record holds "
                                  f"{record.file_size}; the file is corrupt or was edited")
