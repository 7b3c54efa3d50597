"""Convolutions and pooling/upsampling over spatial axes."""

from __future__ import annotations

from ..layout import opaque, plain
from ..trace_types import Info
from .base import _op_name, _shape, handles, producer_of


@handles("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def _conv_transpose(t, args, kwargs, meta):
    return _transposed(t, args[0], args[1], t.bound.get("bias"), t.bound.get("groups", 1), meta)


def _transposed(t, x, w, b, groups, meta):
    """A transposed convolution (a decoder's upsampling): its weight is (in, out / groups, *kernel)."""
    if groups != 1 or not isinstance(x, Info) or not isinstance(w, Info):
        return t.unknown_op("grouped conv_transpose", [x, w], {}, meta)
    out_shape = _shape(meta)
    batched = len(x.shape) == len(w.shape)
    c = 1 if batched else 0
    t.role(w, 0, "in")
    t.role(w, 1, "out")
    t.role(b, 0, "out")
    t.tap(x, c)
    for d in list(w.dims[2:]) + list(x.dims[c + 1 :]):
        t.fix(d, f"{t.where()}: convolution positions")
    t.unify(x.dims[c], w.dims[0])
    channels = list(w.dims[1])
    if isinstance(b, Info):
        channels = t.unify(channels, b.dims[0])
    dims = ([list(x.dims[0])] if batched else []) + [channels] + [opaque(n) for n in out_shape[c + 1 :]]
    return Info(dims, out_shape, produced_by=producer_of(w, b))


@handles("conv1d", "conv2d", "conv3d", "convolution", "_convolution")
def _conv(t, args, kwargs, meta):
    x, w = args[0], args[1]
    b = t.bound.get("bias")
    if t.bound.get("transposed", False):
        return _transposed(t, x, w, b, t.bound.get("groups", 1), meta)
    groups = t.bound.get("groups", 1)
    out_shape = _shape(meta)
    batched = len(x.shape) == len(w.shape)
    c = 1 if batched else 0  # channel axis
    # a grouped (depthwise) conv mixes channels only within its groups: a dense transform of its
    # output units is not one of the layer, so they are per-unit parameters to the alignment
    # (permutations move them; CCA/ZipIt permute such a group instead, and say so)
    t.role(w, 0, "out" if groups == 1 else "param")
    t.role(w, 1, "in")
    t.role(b, 0, "out" if groups == 1 else "param")
    t.tap(x, c)
    for d in list(w.dims[2:]) + list(x.dims[c + 1 :]):  # kernel taps and input positions
        t.fix(d, f"{t.where()}: convolution positions")
    if groups == 1:
        t.unify(x.dims[c], w.dims[1])
        channels = list(w.dims[0])
    else:
        c_in, c_out = x.shape[c], w.shape[0]
        x_space = t.table.new(c_in)
        t.unify(plain(x_space), x.dims[c])
        split_in = t.table.split(x_space, groups)
        w_space = t.table.new(c_out)
        t.unify(plain(w_space), w.dims[0])
        split_out = t.table.split(w_space, groups)
        if split_in is None or split_out is None:
            t.fix(x.dims[c])
            t.fix(w.dims[0])
        else:
            t.table.unify(split_in[0], split_out[0], t.where())
            for inner in split_in[1]:  # every group reads its inputs through the same weight axis
                t.unify(plain(inner), w.dims[1])
        channels = plain(w_space)
    if isinstance(b, Info):
        channels = t.unify(channels, b.dims[0])
    dims = ([list(x.dims[0])] if batched else []) + [channels] + [opaque(n) for n in out_shape[c + 1 :]]
    return Info(dims, out_shape, produced_by=producer_of(w, b))


@handles("max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
         "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
         "adaptive_max_pool2d", "adaptive_max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices",
         "upsample_nearest2d", "upsample_bilinear2d", "_adaptive_avg_pool2d", "lp_pool2d")
def _pool(t, args, kwargs, meta):
    """Pooling/upsampling acts per channel on the spatial axes (the trailing ones)."""
    x = args[0]
    outs = meta if isinstance(meta, (list, tuple)) else [meta]
    spatial = {"1d": 1, "2d": 2, "3d": 3}
    name = _op_name(t.node.target)
    n_spatial = next((v for k, v in spatial.items() if k in name), 2)
    keep = len(x.shape) - n_spatial
    for d in x.dims[keep:]:  # the pooled axes are positions
        t.fix(d, f"{t.where()}: pooled positions")
    results = []
    for m in outs:
        shape = _shape(m)
        dims = [list(d) for d in x.dims[:keep]] + [opaque(n) for n in shape[keep:]]
        results.append(Info(dims, shape))
    return results if isinstance(meta, (list, tuple)) else results[0]
