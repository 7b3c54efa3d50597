"""Normalisation: layer/RMS norm, batch/instance norm and group norm."""

from __future__ import annotations

from ..layout import plain
from ..trace_types import Info
from .base import _op_name, handles, opaque_like


def _norm_params(t, x: Info, axes: list, params: list) -> Info:
    """Per-unit parameters of a norm share the normalised units with each other and with x; the
    output is laid out like them (a copied input axis stops being a copy after the affine)."""
    dims = [list(d) for d in x.dims]
    for pa, xa in enumerate(axes):
        layout = dims[xa]
        for p in params:
            if isinstance(p, Info):
                t.role(p, pa, "param")
                layout = t.unify(layout, p.dims[pa])
        dims[xa] = layout
    return Info(dims, x.shape)


@handles("layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm")
def _layer_norm(t, args, kwargs, meta):
    x, normalized = args[0], args[1]
    k = len(normalized)
    axes = list(range(len(x.shape) - k, len(x.shape)))
    t.tap(x, -1)
    params = [a for a in args[2:4] if isinstance(a, Info)]
    out = _norm_params(t, x, axes, params)
    if isinstance(meta, (list, tuple)):
        return [out] + [opaque_like(m) for m in meta[1:]]
    return out


@handles("batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit", "native_batch_norm",
         "instance_norm", "cudnn_batch_norm", "_batch_norm_impl_index")
def _batch_norm(t, args, kwargs, meta):
    x = args[0]
    t.tap(x, 1)
    params = [a for a in args[1:5] if isinstance(a, Info)]
    out = _norm_params(t, x, [1], params)
    if isinstance(meta, (list, tuple)):
        return [out] + [opaque_like(m) for m in meta[1:]]
    return out


@handles("group_norm", "native_group_norm")
def _group_norm(t, args, kwargs, meta):
    """Statistics per group of channels: whole groups may swap, and channels may move within
    their group (a product space: groups x channels per group)."""
    x = args[0]
    name = _op_name(t.node.target)
    if name == "group_norm":
        groups, params = args[1], [a for a in args[2:4] if isinstance(a, Info)]
    else:  # native_group_norm(input, weight, bias, N, C, HxW, group, eps)
        groups, params = args[6], [a for a in args[1:3] if isinstance(a, Info)]
    t.tap(x, 1)
    space = t.table.new(x.shape[1])
    t.unify(plain(space), x.dims[1])
    if t.table.split(space, groups) is None:
        t.fix(x.dims[1], f"{t.where()}: channel groups across an existing structure")
    out = _norm_params(t, x, [1], params)
    if isinstance(meta, (list, tuple)):
        return [out] + [opaque_like(m) for m in meta[1:]]
    return out
