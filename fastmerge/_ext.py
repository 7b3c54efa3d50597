"""Loads the compiled engine (fastmerge/_C*.so) once, on first use, and says why when it cannot.

Importing fastmerge never fails because of the compiled library: when it is missing, was built for
another torch, or is disabled with FASTMERGE_DISABLE_EXT=1, every op falls back to its pure-torch
reference after one warning, and `fastmerge info` prints the reason.
"""

from __future__ import annotations

import glob
import os
import threading
import warnings
from collections.abc import Callable

import torch

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_REBUILD_HINT = "rebuild it against the installed torch with: pip install --no-build-isolation -e ."


class _State:
    loaded: bool | None = None  # None: not tried yet
    reason: str = ""
    path: str | None = None
    warned: bool = False


_state = _State()
_lock = threading.Lock()
# Python parts of the ops (fake kernels, autograd formulas) that need the compiled ops to exist:
# fastmerge.ops registers them here, so this loader imports nothing of fastmerge (no cycle).
_after_load: list[Callable[[], None]] = []


def after_load(callback: Callable[[], None]) -> None:
    """Runs `callback` once the library has loaded (at once when it already has)."""
    if _state.loaded:
        callback()
    else:
        _after_load.append(callback)


def _find_library() -> str | None:
    candidates = sorted(glob.glob(os.path.join(_PACKAGE_DIR, "_C*.so")) + glob.glob(os.path.join(_PACKAGE_DIR, "_C*.pyd")))
    return candidates[0] if candidates else None


def load() -> bool:
    """Loads the library if not done yet; returns whether the compiled ops are available."""
    if _state.loaded is not None:
        return _state.loaded
    with _lock:
        if _state.loaded is not None:
            return _state.loaded
        if os.environ.get("FASTMERGE_DISABLE_EXT", "0") == "1":
            _state.reason = "disabled by FASTMERGE_DISABLE_EXT=1"
            _state.loaded = False
            return False
        path = _find_library()
        if path is None:
            _state.reason = f"no compiled library (_C*.so) in {_PACKAGE_DIR}; {_REBUILD_HINT}"
            _state.loaded = False
            return False
        try:
            torch.ops.load_library(path)
        except (OSError, RuntimeError) as exc:  # wrong torch ABI, missing symbols, bad file
            _state.reason = f"{os.path.basename(path)} failed to load ({exc}); {_REBUILD_HINT}"
            _state.loaded = False
            return False
        _state.path = path
        for callback in _after_load:
            callback()
        _state.loaded = True
        return True


def available() -> bool:
    """True when the compiled ops can be used."""
    return load()


def unavailable_reason() -> str:
    """Why the compiled library is not in use ('' when it is)."""
    load()
    return _state.reason


def warn_fallback() -> None:
    """One warning per process, the first time an op falls back to its reference."""
    if _state.warned:
        return
    _state.warned = True
    warnings.warn(
        f"fastmerge: the compiled engine is unavailable ({_state.reason}); "
        "ops run their slower pure-torch reference implementations.",
        RuntimeWarning,
        stacklevel=3,
    )


def build_info() -> dict[str, str]:
    """Facts about the build: compiled backends, torch it was built against, compiler."""
    if not load():
        return {}
    lines = torch.ops.fastmerge.build_info().strip().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


def library_path() -> str | None:
    load()
    return _state.path
