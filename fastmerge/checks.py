"""What must hold of a set of models before any merge work: one architecture, one device, finite
weights. One comparison of tensor layouts serves models, checkpoint files and a file against the
model it should load into."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from .errors import NonFiniteError, ShapeMismatchError
from .ops import count_nonfinite
from .stages import timed


def layout_difference(reference: Mapping[str, object], other: Mapping[str, object]):
    """(missing, extra, differ): sorted tensor names `other` lacks, has in excess, and holds with
    another layout (any comparable value per name: a shape, or (shape, dtype))."""
    missing = sorted(set(reference) - set(other))
    extra = sorted(set(other) - set(reference))
    differ = sorted(k for k in set(reference) & set(other) if reference[k] != other[k])
    return missing, extra, differ


def state_layout(model: nn.Module) -> dict[str, tuple]:
    """{name: (shape, dtype)} of a model's state dict."""
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def check_same_architecture(models: Sequence[nn.Module]) -> None:
    """Same tensor names, shapes and dtypes in every model; the error lists what differs."""
    ref = state_layout(models[0])
    for i, m in enumerate(models[1:], start=1):
        other = state_layout(m)
        missing, extra, differ = layout_difference(ref, other)
        if missing or extra or differ:
            parts = []
            if missing:
                parts.append(f"missing {missing[:3]}")
            if extra:
                parts.append(f"extra {extra[:3]}")
            if differ:
                k = differ[0]
                parts.append(f"{len(differ)} tensors differ, e.g. {k}: {ref[k]} vs {other[k]}")
            raise ShapeMismatchError(f"model {i} does not have model 0's architecture: " + "; ".join(parts))
@timed("checks")
def check_models(models: Sequence[nn.Module]) -> None:
    """What must hold before any work: one architecture (check_same_architecture), one device, and
    finite floating weights (a NaN in one parent would silently spread into the merge)."""
    check_same_architecture(models)
    devices = [{t.device for t in m.state_dict().values()} for m in models]
    if any(len(d) > 1 for d in devices) or len({d for ds in devices for d in ds}) > 1:
        where = ", ".join(f"model {i}: {sorted(str(x) for x in d)}" for i, d in enumerate(devices))
        raise ShapeMismatchError(f"the models are on different devices ({where}); move them to one device "
                                 "(model.to(device)) before merging")
    for i, m in enumerate(models):
        state = m.state_dict()
        counts = count_nonfinite(list(state.values()))  # one call, read back once
        if bool(counts.any()):
            bad = [(k, int(c)) for k, c in zip(state, counts.tolist()) if c]
            raise NonFiniteError(f"model {i}: {len(bad)} tensor(s) hold NaN or Inf, e.g. {bad[0][0]!r} ({bad[0][1]} "
                                 "entries); that checkpoint is broken (diverged training?): fix or drop it")


def tied_names(state: Mapping[str, object]) -> list[list[str]]:
    """Names of a state dict (``state_dict(keep_vars=True)``) that share one tensor (tied weights),
    in state order; each list has two or more names. Empty tensors are never tied."""
    by_storage: dict = {}
    for name, t in state.items():
        if t.numel():
            by_storage.setdefault((t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype), []).append(name)
    return [names for names in by_storage.values() if len(names) > 1]
