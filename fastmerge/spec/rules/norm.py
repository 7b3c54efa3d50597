"""Normalisation: layer/RMS norm, batch/instance norm and group norm."""

from __future__ import annotations

from ..layout import plain
from ..trace_types import Info
from ..types import NormFold
from .base import _op_name, _whole_param, handles, opaque_like

_EVAL_BATCH_NORMS = ("_native_batch_norm_legit_no_training",)


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
    _record_fold(t, x, args[1:5])
    out = _norm_params(t, x, [1], params)
    if isinstance(meta, (list, tuple)):
        return [out] + [opaque_like(m) for m in meta[1:]]
    return out


def _record_fold(t, x, params) -> None:
    """An eval-mode BatchNorm with affine parameters and running statistics that is the only reader
    of a Linear/Conv output can be folded into it (NormFold)."""
    name = _op_name(t.node.target)
    training = t.bound.get("training", name not in _EVAL_BATCH_NORMS)
    source = t.node.args[0]
    if training or not isinstance(x, Info) or x.produced_by is None or len(getattr(source, "users", ())) != 1:
        return
    names = [_whole_param(p) for p in params]
    if len(names) != 4 or any(n is None for n in names):
        return
    norm = names[0].rsplit(".", 1)[0] if "." in names[0] else ""
    fold = NormFold(producer=x.produced_by[0], producer_bias=x.produced_by[1], norm=norm,
                    eps=float(t.bound.get("eps", 1e-5)))
    if [fold.tensor(w) for w in ("weight", "bias", "running_mean", "running_var")] == names:
        t.folds.append(fold)


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
