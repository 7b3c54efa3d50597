"""Indexing by data: index/gather/scatter/masked ops and embedding lookups."""

from __future__ import annotations

from ..layout import opaque
from ..trace_types import Info
from .base import _dim, _flatten, _op_name, _shape, handles, opaque_like


@handles("index_select", "gather", "index", "take_along_dim", "scatter", "index_put", "scatter_add", "index_add",
         "index_copy", "masked_select", "masked_scatter")
def _indexing(t, args, kwargs, meta):
    """Indexing by data: the indexed axes cannot move (the index values name positions) and become
    non-features; the untouched axes keep their layout where the result keeps them."""
    x = args[0]
    name = _op_name(t.node.target)
    for other in args[1:]:  # index tensors and sources: their values are not permuted with us
        for v in _flatten(other):
            if isinstance(v, Info):
                for d in v.dims:
                    t.fix(d, f"{t.where()}: used as an index or a scattered source")
    if not isinstance(x, Info):
        return opaque_like(meta)
    n, out_shape = len(x.shape), _shape(meta)
    if name == "index":
        indexed = [i for i, idx in enumerate(args[1]) if idx is not None]
        for i in indexed:
            t.fix(x.dims[i], f"{t.where()}: indexed by data")
        rest = [i for i in range(n) if i not in indexed]
        k = len(out_shape) - len(rest)  # dims of the broadcast index
        if indexed and indexed == list(range(indexed[0], indexed[-1] + 1)):
            lead = [i for i in rest if i < indexed[0]]
            dims = [list(x.dims[i]) for i in lead] + [opaque(m) for m in out_shape[len(lead) : len(lead) + k]]
            dims += [list(x.dims[i]) for i in rest if i > indexed[-1]]
        else:
            dims = [opaque(m) for m in out_shape[:k]] + [list(x.dims[i]) for i in rest]
        return Info(dims, out_shape)
    if name == "index_select":
        dim = _dim(t.bound.get("dim", 0), n)
        t.fix(x.dims[dim], f"{t.where()}: indexed by data")
        dims = [list(d) for d in x.dims]
        dims[dim] = opaque(out_shape[dim])
        return Info(dims, out_shape)
    for d in x.dims:  # gather/scatter/masked ops: positions follow the data
        t.fix(d, f"{t.where()}: indexed by data")
    return opaque_like(meta)


@handles("embedding")
def _embedding(t, args, kwargs, meta):
    weight, indices = args[0], args[1]
    out_shape = _shape(meta)
    if not isinstance(weight, Info):
        return opaque_like(meta)
    t.fix(weight.dims[0], f"{t.where()}: rows picked by token ids")
    t.role(weight, 1, "out")
    lead = indices.dims if isinstance(indices, Info) else [opaque(n) for n in out_shape[:-1]]
    return Info([list(d) for d in lead] + [list(weight.dims[1])], out_shape)
