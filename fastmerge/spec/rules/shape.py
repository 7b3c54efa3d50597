"""Shape ops: reshape, permute, expand, repeat, slice, split, select, unbind, cat and stack."""

from __future__ import annotations

from ..layout import Factor, Layout, family, opaque, plain, replica, reshape_layout, unify_layouts
from ..spaces import find
from ..trace_types import Info
from .base import _dim, _op_name, _shape, handles, opaque_like


@handles("view", "_unsafe_view", "reshape", "view_copy", "flatten", "unflatten", "squeeze", "unsqueeze",
         "expand_as", "view_as", "reshape_as")
def _reshape(t, args, kwargs, meta):
    x = args[0]
    out_shape = _shape(meta)
    if not isinstance(x, Info):
        return opaque_like(meta)
    if out_shape == x.shape:
        return Info([list(d) for d in x.dims], out_shape, x.param, x.param_axes)
    if x.param_axes is not None and [n for n in out_shape if n != 1] == [n for n in x.shape if n != 1]:
        # only size-1 axes added or removed: still the parameter's axes, in order
        kept = iter([a for a, n in zip(x.param_axes, x.shape) if n != 1])
        axes = tuple(next(kept) if n != 1 else None for n in out_shape)
        dims = iter([d for d, n in zip(x.dims, x.shape) if n != 1])
        return Info([list(next(dims)) if n != 1 else [] for n in out_shape], out_shape, x.param, axes)
    dims = reshape_layout(t.table, x.dims, list(out_shape), t.where())
    if dims is None:
        for d in x.dims:
            t.fix(d, f"{t.where()}: reshape that splits an axis across its structure")
        return opaque_like(meta)
    return Info(dims, out_shape)


@handles("permute", "transpose", "t", "movedim", "swapaxes", "numpy_T", "mT")
def _permute(t, args, kwargs, meta):
    x = args[0]
    if not isinstance(x, Info):
        return opaque_like(meta)
    n = len(x.shape)
    order = list(range(n))
    name = _op_name(t.node.target)
    if name == "permute":
        order = [_dim(d, n) for d in args[1]]
    elif name in ("transpose", "swapaxes"):
        a, b = _dim(args[1], n), _dim(args[2], n)
        order[a], order[b] = order[b], order[a]
    elif name in ("t", "numpy_T", "mT"):
        order = list(range(n))[::-1] if name != "mT" else list(range(n - 2)) + [n - 1, n - 2]
    else:  # movedim(x, source, destination)
        src = [args[1]] if isinstance(args[1], int) else list(args[1])
        dst = [args[2]] if isinstance(args[2], int) else list(args[2])
        src, dst = [_dim(s, n) for s in src], [_dim(d, n) for d in dst]
        rest = [i for i in range(n) if i not in src]
        order = [None] * n
        for s, d in zip(src, dst):
            order[d] = s
        it = iter(rest)
        order = [o if o is not None else next(it) for o in order]
    axes = tuple(x.param_axes[i] for i in order) if x.param_axes is not None else None
    return Info([list(x.dims[i]) for i in order], _shape(meta), x.param, axes)


@handles("expand", "expand_copy", "broadcast_to")
def _expand(t, args, kwargs, meta):
    x = args[0]
    out_shape = _shape(meta)
    if not isinstance(x, Info):
        return opaque_like(meta)
    offset = len(out_shape) - len(x.shape)
    dims = [replica(n) for n in out_shape[:offset]]
    for i, d in enumerate(x.dims):
        n = out_shape[offset + i]
        dims.append(replica(n) if x.shape[i] == 1 and n > 1 else list(d))
    return Info(dims, out_shape)


@handles("repeat")
def _repeat(t, args, kwargs, meta):
    x, repeats = args[0], list(args[1])
    out_shape = _shape(meta)
    if not isinstance(x, Info):
        return opaque_like(meta)
    offset = len(repeats) - len(x.shape)
    dims = [replica(r) for r in repeats[:offset]]
    for i, d in enumerate(x.dims):
        dims.append(replica(repeats[offset + i]) + list(d))  # tiles: whole copies outside
    return Info(dims, out_shape)


@handles("repeat_interleave")
def _repeat_interleave(t, args, kwargs, meta):
    x = args[0]
    repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
    dim = args[2] if len(args) > 2 else kwargs.get("dim")
    if not isinstance(x, Info) or not isinstance(repeats, int) or dim is None:
        return t.unknown_op("repeat_interleave", args, kwargs, meta)
    dim = _dim(dim, len(x.shape))
    dims = [list(d) for d in x.dims]
    dims[dim] = dims[dim] + replica(repeats)  # each unit copied in place
    return Info(dims, _shape(meta))


def _slice_layout(t, d: Layout, size: int, start: int, stop: int, why: str) -> Layout:
    if start <= 0 and stop >= size:
        return list(d)
    n = stop - start
    if not d or all(f.opaque for f in d):
        return opaque(n)
    if len(d) == 1:
        f = d[0]
        if f.replica:
            return replica(n)
        if f.space is not None:
            seg = t.table.segment(f.space, start, stop)
            if seg is not None:
                return plain(seg)
        elif f.members is not None:
            segs = [t.table.segment(m, start, stop) for m in f.members]
            if all(s is not None for s in segs):
                return family(segs, f.index)
    t.fix(d, f"{why}: slice across a structured axis")
    return opaque(n)


@handles("slice", "narrow", "slice_copy")
def _slice(t, args, kwargs, meta):
    x = args[0]
    if not isinstance(x, Info):
        return opaque_like(meta)
    name = _op_name(t.node.target)
    dim = _dim(args[1] if len(args) > 1 else 0, len(x.shape))
    size = x.shape[dim]
    if name == "narrow":
        start, length = args[2], args[3]
        start = start + size if start < 0 else start
        stop, step = start + length, 1
    else:
        start = args[2] if len(args) > 2 and args[2] is not None else 0
        stop = args[3] if len(args) > 3 and args[3] is not None else size
        step = args[4] if len(args) > 4 else 1
        start = max(0, start + size if start < 0 else start)
        stop = min(size, stop + size if stop < 0 else stop)
    dims = [list(d) for d in x.dims]
    partial = not (start <= 0 and stop >= size and step == 1)
    if step != 1 or (partial and x.param is not None):
        # A strided slice; or part of a parameter/buffer cut to the traced input's size (a causal
        # mask cut to the sequence length): the units left out would be used by other input
        # shapes, so the axis cannot move.
        t.fix(dims[dim], f"{t.where()}: {'strided slice' if step != 1 else 'parameter cut to the input size'}")
        dims[dim] = opaque(len(range(start, stop, step)))
    else:
        dims[dim] = _slice_layout(t, dims[dim], size, start, stop, t.where())
    # still a view of the parameter: a later cut along another axis is a cut of the parameter too
    return Info(dims, _shape(meta), x.param, x.param_axes)


@handles("split", "split_with_sizes", "chunk", "tensor_split", "unsafe_split")
def _split(t, args, kwargs, meta):
    x = args[0]
    if not isinstance(x, Info):
        return opaque_like(meta)
    name = _op_name(t.node.target)
    dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
    dim = _dim(dim, len(x.shape))
    sizes = [int(m.shape[dim]) for m in meta]
    if name == "tensor_split":
        return t.unknown_op(name, args, kwargs, meta)
    outs, start = [], 0
    for m, n in zip(meta, sizes):
        dims = [list(d) for d in x.dims]
        dims[dim] = _slice_layout(t, x.dims[dim], x.shape[dim], start, start + n, t.where())
        outs.append(Info(dims, _shape(m)))
        start += n
    return outs


def _select_layout(t, x: Info, dim: int, index: int) -> list:
    """Picks one unit of an axis: that axis is pinned (fixed); families indexed by its space
    collapse to the chosen member."""
    d = x.dims[dim]
    chosen = {}
    if len(d) == 1 and d[0].space is not None:
        chosen = {id(d[0].space): index}
        space = d[0].space
    else:
        space = None
    t.fix(d, f"{t.where()}: selects one index of the axis")
    dims = []
    for i, other in enumerate(x.dims):
        if i == dim:
            continue
        new = []
        for f in other:
            if f.members is not None and space is not None and f.index is space and id(space) in chosen:
                new.append(Factor(f.size, space=f.members[index]))
            else:
                new.append(f)
        dims.append(new)
    return dims


@handles("select", "select_copy")
def _select(t, args, kwargs, meta):
    x = args[0]
    if not isinstance(x, Info):
        return opaque_like(meta)
    dim = _dim(args[1], len(x.shape))
    index = args[2] % x.shape[dim]
    return Info(_select_layout(t, x, dim, index), _shape(meta))


@handles("unbind")
def _unbind(t, args, kwargs, meta):
    x = args[0]
    if not isinstance(x, Info):
        return opaque_like(meta)
    dim = _dim(args[1] if len(args) > 1 else 0, len(x.shape))
    return [Info(_select_layout(t, x, dim, i), _shape(m)) for i, m in enumerate(meta)]


@handles("cat", "concat", "concatenate")
def _cat(t, args, kwargs, meta):
    tensors = [x for x in args[0] if isinstance(x, Info) and x.shape != (0,)]
    out_shape = _shape(meta)
    if not tensors:
        return opaque_like(meta)
    ndim = len(out_shape)
    dim = _dim(args[1] if len(args) > 1 else kwargs.get("dim", 0), ndim)
    dims = []
    for i in range(ndim):
        if i == dim:
            parts = []
            for x in tensors:
                t.role(x, dim, "out")
                layout = x.dims[i]
                n = x.shape[i]
                if layout and all(f.opaque or all(find(sp).fixed for sp in f.spaces()) for f in layout):
                    parts.append(t.table.new(n, fixed=True, why=f"{t.where()}: concatenated with non-features"))
                    continue
                part = t.table.new(n)
                unify_layouts(t.table, plain(part), layout, t.where())
                parts.append(part)
            if all(find(p).fixed for p in parts):
                dims.append(opaque(out_shape[i]))  # nothing here can move (e.g. rotary tables)
            else:
                dims.append(plain(t.table.concat(parts)) if len(parts) > 1 else plain(parts[0]))
        else:
            merged = None
            for x in tensors:
                if x.shape[i] == 1 and out_shape[i] != 1:
                    continue
                merged = list(x.dims[i]) if merged is None else t.unify(merged, x.dims[i])
            dims.append(merged or [])
    return Info(dims, out_shape)


@handles("stack")
def _stack(t, args, kwargs, meta):
    tensors = [x for x in args[0] if isinstance(x, Info)]
    out_shape = _shape(meta)
    dim = _dim(args[1] if len(args) > 1 else kwargs.get("dim", 0), len(out_shape))
    if not tensors:
        return opaque_like(meta)
    merged = [list(d) for d in tensors[0].dims]
    for x in tensors[1:]:
        merged = [t.unify(a, b) for a, b in zip(merged, x.dims)]
    merged.insert(dim, opaque(out_shape[dim]))  # which input: not a feature
    return Info(merged, out_shape)
