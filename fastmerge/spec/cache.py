"""The spec of an architecture, traced once per process: merges repeated in a loop (federated
rounds, a hyper-parameter grid, every epoch of a training run) reuse it.

Two models share a spec when their class, their module tree (its repr: every layer with its
sizes and options), their tensors (names, shapes, dtypes) and the example inputs' shapes and dtypes
agree; a model whose forward depends on something else (a flag outside the module tree) should be
given its spec explicitly (merge(..., spec=...)).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from .trace import trace_spec
from .types import MergeSpec

_CAPACITY = 16
_specs: OrderedDict[tuple, MergeSpec] = OrderedDict()


def _signature(value):
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    if isinstance(value, (list, tuple)):
        return tuple(_signature(v) for v in value)
    if isinstance(value, dict):
        return tuple((k, _signature(v)) for k, v in sorted(value.items()))
    return repr(value)


def architecture_key(model: torch.nn.Module, args: tuple, kwargs: dict | None = None) -> tuple:
    """What the spec of `model` traced on inputs like (args, kwargs) depends on."""
    cls = type(model)
    layout = tuple((k, tuple(v.shape), v.dtype) for k, v in model.state_dict().items())
    return (cls.__module__, cls.__qualname__, repr(model), layout, _signature(tuple(args)), _signature(kwargs or {}))


def cached_trace_spec(model: torch.nn.Module, args: tuple, kwargs: dict | None = None) -> MergeSpec:
    """trace_spec, once per architecture and input signature (the last 16 are kept)."""
    key = architecture_key(model, args, kwargs)
    spec = _specs.get(key)
    if spec is None:
        spec = trace_spec(model, args, kwargs)
        _specs[key] = spec
        if len(_specs) > _CAPACITY:
            _specs.popitem(last=False)
    else:
        _specs.move_to_end(key)
    return spec
