"""Early writeback: the kernel is asked to start writing a file's dirty pages to disk while the
merge goes on (Linux sync_file_range, SYNC_FILE_RANGE_WRITE), so the fsync that completes an
output waits for the last pages instead of the whole file. A hint: where the call is missing
(not Linux) or fails, nothing changes but the time the fsync takes."""

from __future__ import annotations

import ctypes
import sys

_SYNC_FILE_RANGE_WRITE = 2  # start writeback of the range's dirty pages; do not wait for it


def _load():
    if not sys.platform.startswith("linux"):
        return None
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


_sync_file_range = _load()


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Starts writing [offset, offset + nbytes) of `fd` to disk; returns without waiting (ctypes
    releases the GIL meanwhile)."""
    if _sync_file_range is not None and nbytes > 0:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)
