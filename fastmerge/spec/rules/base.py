"""The op-rule registry (`handles`, HANDLERS, IGNORED) and the helpers several op families share."""

from __future__ import annotations

import torch

from ..layout import opaque, replica
from ..trace_types import Info

HANDLERS: dict = {}
IGNORED = {"_assert_tensor_metadata", "_assert_async", "_assert_scalar", "sym_constrain_range",
           "sym_constrain_range_for_size", "_local_scalar_dense", "sym_size", "sym_numel", "sym_stride"}


def handles(*names):
    def register(fn):
        for n in names:
            HANDLERS[n] = fn
        return fn

    return register


def _bind(target, args, kwargs) -> dict:
    """Arguments by schema name (positional or keyword, defaults filled in)."""
    schema = getattr(target, "_schema", None)
    if schema is None:
        return dict(kwargs)
    out = {}
    for i, a in enumerate(schema.arguments):
        if i < len(args):
            out[a.name] = args[i]
        elif a.name in kwargs:
            out[a.name] = kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
    return out


def _op_name(target) -> str:
    packet = getattr(target, "overloadpacket", None)
    if packet is not None:
        return packet.__name__
    return getattr(target, "__name__", str(target))


def _flatten(value):
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from _flatten(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _flatten(v)
    else:
        yield value


def _shape(meta) -> tuple:
    return tuple(int(s) for s in meta.shape)


def opaque_like(meta):
    if isinstance(meta, torch.Tensor):
        shape = _shape(meta)
        return Info([opaque(n) for n in shape], shape)
    if isinstance(meta, (list, tuple)):
        return type(meta)(opaque_like(m) for m in meta)
    return None


def _whole_param(info) -> str | None:
    """The parameter name when `info` is a parameter itself (not a view or slice of one)."""
    if isinstance(info, Info) and info.param is not None and info.param_axes == tuple(range(len(info.shape))):
        return info.param
    return None


def producer_of(weight, bias) -> tuple | None:
    """Info.produced_by of a Linear/Conv output: (weight name, bias name or None), when both are
    parameters as they are (a BatchNorm reading this output can be folded into them)."""
    w = _whole_param(weight)
    if w is None or (bias is not None and _whole_param(bias) is None):
        return None
    return (w, _whole_param(bias))


def replica_like(meta):
    shape = _shape(meta)
    return Info([replica(n) for n in shape], shape)


def _dim(d: int, ndim: int) -> int:
    return d % ndim if ndim else 0


def _broadcast(t, operands, meta, param_role: str = "param") -> Info:
    """Elementwise op with broadcasting: aligned axes of size > 1 hold the same units."""
    shape = _shape(meta)
    ndim = len(shape)
    dims: list = [None] * ndim
    for x in operands:
        if not isinstance(x, Info):
            continue
        offset = ndim - len(x.shape)
        for i, d in enumerate(x.dims):
            j = offset + i
            if x.shape[i] == 1:
                continue
            t.role(x, i, param_role)
            dims[j] = list(d) if dims[j] is None else t.unify(dims[j], d)
    return Info([d if d is not None else [] for d in dims], shape)
