"""Reductions (sum, mean, max, ...) and ops that depend on the order of units (argmax, sort, cumsum, ...)."""

from __future__ import annotations

import torch

from ..layout import opaque
from ..trace_types import Info
from .base import _broadcast, _dim, _op_name, _shape, handles, opaque_like


@handles("sum", "mean", "amax", "amin", "var", "std", "logsumexp", "norm", "prod", "all", "any", "nansum",
         "linalg_vector_norm", "max", "min", "var_mean", "std_mean", "median", "nanmedian", "mode")
def _reduce(t, args, kwargs, meta):
    """Sum/mean/max over a feature axis is invariant to permuting it; the axis disappears. When
    indices come out too (max.dim, median), they name positions: the reduced axes are fixed."""
    x = args[0]
    if not isinstance(x, Info):
        return opaque_like(meta)
    if len(args) > 1 and isinstance(args[1], Info):  # elementwise max(a, b) / min(a, b)
        return _broadcast(t, args[:2], meta)
    dims_arg = t.bound.get("dim")
    n = len(x.shape)
    if dims_arg is None or dims_arg == []:
        reduced = set(range(n))
    else:
        reduced = {_dim(d, n) for d in ([dims_arg] if isinstance(dims_arg, int) else dims_arg)}
    first = meta if isinstance(meta, torch.Tensor) else meta[0]
    out_shape = _shape(first)
    if len(out_shape) == n and n:  # keepdim
        keep = [[] if i in reduced else list(d) for i, d in enumerate(x.dims)]
    else:
        keep = [list(d) for i, d in enumerate(x.dims) if i not in reduced]
    if not isinstance(meta, torch.Tensor):
        name = _op_name(t.node.target)
        if name not in ("var_mean", "std_mean"):  # (values, indices)
            for i in reduced:
                t.fix(x.dims[i], f"{t.where()}: indices along the reduced axis")
        return [Info([list(d) for d in keep], _shape(m)) for m in meta]
    return Info(keep, out_shape)


@handles("argmax", "argmin", "sort", "topk", "cumsum", "cumprod", "cummax", "cummin", "flip", "roll", "argsort",
         "kthvalue", "diff")
def _order_dependent(t, args, kwargs, meta):
    """Results that depend on the order of units along some axes: those axes are fixed (and
    become non-features); the other axes keep their layout."""
    x = args[0]
    if not isinstance(x, Info):
        return opaque_like(meta)
    n = len(x.shape)
    dims_arg = t.bound.get("dims", t.bound.get("dim"))
    if dims_arg is None or dims_arg == []:
        touched = set(range(n))
    else:
        touched = {_dim(d, n) for d in ([dims_arg] if isinstance(dims_arg, int) else dims_arg)}
    for i in touched:
        t.fix(x.dims[i], f"{t.where()}: depends on the order of units")
    metas = meta if isinstance(meta, (list, tuple)) else [meta]
    outs = []
    for m in metas:
        shape = _shape(m)
        if len(shape) == n:
            dims = [opaque(shape[i]) if i in touched else list(x.dims[i]) for i in range(n)]
        else:  # the axis was reduced (argmax without keepdim)
            dims = [list(x.dims[i]) for i in range(n) if i not in touched]
            if len(dims) != len(shape):
                dims = [opaque(k) for k in shape]
        outs.append(Info(dims, shape))
    return outs if isinstance(meta, (list, tuple)) else outs[0]
