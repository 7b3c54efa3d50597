"""Where the time of a merge goes: named stages, timed exclusively (a stage inside another pauses
it), recorded only while someone asks (the CLI prints a one-line summary at the end of a merge).

    with record_stages() as times:
        fastmerge.merge(models, "cca", data=loader)
    print(stage_summary(times))   # "trace 0.31 s, statistics 0.52 s, align 0.08 s, ..."

The library marks its stages with `with stage("statistics"):`; outside record_stages that costs
one context-variable read.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

# the recording in progress: (seconds per stage, stack of [stage, start] of the open stages)
_recording: ContextVar[tuple[dict, list] | None] = ContextVar("fastmerge_stages", default=None)


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Times the block as stage `name` (added up over repeats) while a recording is active."""
    recording = _recording.get()
    if recording is None:
        yield
        return
    times, stack = recording
    now = time.perf_counter()
    if stack:  # the enclosing stage pauses
        outer = stack[-1]
        times[outer[0]] = times.get(outer[0], 0.0) + now - outer[1]
    stack.append([name, now])
    try:
        yield
    finally:
        now = time.perf_counter()
        _, start = stack.pop()
        times[name] = times.get(name, 0.0) + now - start
        if stack:
            stack[-1][1] = now  # the enclosing stage resumes


@contextmanager
def record_stages() -> Iterator[dict[str, float]]:
    """Records the stages run inside the block: yields {stage: seconds}, filled as they end."""
    times: dict[str, float] = {}
    token = _recording.set((times, []))
    try:
        yield times
    finally:
        _recording.reset(token)


def stage_summary(times: dict[str, float]) -> str:
    """One line: each stage's seconds in the order they first ran, and the total."""
    parts = [f"{name} {seconds:.2f} s" for name, seconds in times.items()]
    return f"time per stage: {', '.join(parts)} (total {sum(times.values()):.2f} s)"


def timed(name: str):
    """Decorator: every call of the function is (part of) stage `name`."""

    def decorate(function):
        @functools.wraps(function)
        def timed_call(*args, **kwargs):
            with stage(name):
                return function(*args, **kwargs)

        return timed_call

    return decorate
