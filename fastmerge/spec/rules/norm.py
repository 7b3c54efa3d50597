"""Normalisation: layer/RMS norm, batch/instance norm and group norm."""

from __future__ import annotations

from ..layout import plain
from ..trace_types import Info
from ..types import NormFold, StreamNorm
from .base import IGNORED, _op_name, _whole_param, handles, opaque_like

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
    if k == 1:
        _record_stream_norm(t, args)
    out = _norm_params(t, x, axes, params)
    if isinstance(meta, (list, tuple)):
        return [out] + [opaque_like(m) for m in meta[1:]]
    return out


# ops a norm's output may pass through on its way to a Linear: views keep every row of the
# normalised (last) axis whole when the last axis keeps its size; the others must leave it last
_VIEWS = {"view", "reshape", "_unsafe_view", "flatten", "unsqueeze", "squeeze", "clone", "contiguous", "alias",
          "detach", "dropout", "to", "_to_copy", "type_as"}
_MOVES = {"transpose", "permute", "select", "slice"}


def _record_stream_norm(t, args) -> None:
    """A LayerNorm/RMSNorm over the last axis whose output only Linear layers read, each through a
    weight of its own (StreamNorm): its affine part can be folded into them."""
    name = _op_name(t.node.target)
    kind = "rms" if "rms" in name else "layer"
    weight = args[2] if len(args) > 2 and isinstance(args[2], Info) else None
    bias = args[3] if kind == "layer" and len(args) > 3 and isinstance(args[3], Info) else None
    names = [_whole_param(p) if p is not None else None for p in (weight, bias)]
    if any(p is not None and n is None for p, n in zip((weight, bias), names)):
        return
    start = [t.node]
    if name in ("native_layer_norm", "_fused_rms_norm"):  # tuple outputs: only the normalised one may be read
        if any(_op_name(u.target) != "getitem" or u.args[1] != 0 for u in t.node.users):
            return
        start = list(t.node.users)
    norm = stream_norm(t, start, kind, names[0], names[1], int(args[1][0]))
    if norm is not None:
        t.norms.append(norm)


def stream_norm(t, outputs, kind: str, weight: str | None, bias: str | None, width: int) -> StreamNorm | None:
    """The StreamNorm of a norm whose output nodes are `outputs`: its readers when only Linear layers
    with weights of their own read it (through row-preserving ops), else one that says why not
    (None when it has no parameters to say it of)."""
    readers: list = []
    stack = [(u, node) for node in outputs for u in node.users]
    while stack:
        node, parent = stack.pop()
        found = _reader(t, node, parent, width)
        if found == "skip":
            continue
        if found == "pass":
            stack.extend((u, node) for u in node.users)
        elif isinstance(found, str):
            return StreamNorm(kind=kind, weight=weight, bias=bias, obstacle=found) if (weight or bias) else None
        else:
            readers.append(found)
    return StreamNorm(kind=kind, weight=weight, bias=bias, readers=tuple(readers)) if readers else None


def _reader(t, node, parent, width):
    """"pass" for an op that keeps the normalised rows whole (its users are looked at next), the
    (weight, bias, input axis) of a Linear/addmm reading them with parameters of its own, or why
    the norm's output cannot take its affine part (a string)."""
    op = _op_name(node.target) if node.op == "call_function" else ""
    args = node.args
    if op in IGNORED:
        return "skip"
    if op in _VIEWS | _MOVES:
        after = node.meta.get("val")
        before = parent.meta.get("val")
        moved = f"its output is reshaped across the normalised axis ({op})"
        if not args or args[0] is not parent or after is None or before is None or not len(after.shape):
            return moved
        if int(after.shape[-1]) != width:
            return moved
        last, ndim = len(before.shape) - 1, len(before.shape)
        if op == "transpose" and last in {int(args[1]) % ndim, int(args[2]) % ndim} and args[1] != args[2]:
            return moved
        if op == "permute" and int(args[1][-1]) % ndim != last:
            return moved
        if op == "select" and int(args[1]) % ndim == last:
            return moved
        return "pass"
    if op == "linear" and args and args[0] is parent:
        return _own_params(t, args[1], args[2] if len(args) > 2 else node.kwargs.get("bias"), 1)
    if op == "addmm" and len(args) > 2 and args[1] is parent and args[0] is not parent and args[2] is not parent:
        return _own_params(t, args[2], args[0], 0)
    return f"its output is read by {op or node.op} ({node.name}), not only by Linear layers"


def _own_params(t, weight_node, bias_node, axis):
    """(weight, bias, axis) when both are whole parameters that nothing else reads, else why not."""
    out = []
    for node in (weight_node, bias_node):
        if node is None:
            out.append(None)
            continue
        name = _whole_param(t.lookup(node)) if hasattr(node, "users") else None
        if name is None:
            return "a Linear reading its output has a computed weight or bias"
        if len(node.users) != 1 or name in t.aliases:
            return f"{name}, which reads its output, is tied to or shared with another use"
        out.append(name)
    return (out[0], out[1], axis)


@handles("batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit", "native_batch_norm",
         "instance_norm", "cudnn_batch_norm", "_batch_norm_impl_index")
def _batch_norm(t, args, kwargs, meta):
    x = args[0]
    t.tap(x, 1)
    params = [a for a in args[1:5] if isinstance(a, Info)]
    _record_fold(t, x, args[1:5])
    name = _op_name(t.node.target)
    if isinstance(x, Info) and (name == "instance_norm" or t.bound.get("training", name not in _EVAL_BATCH_NORMS)):
        # statistics of the batch or the sample, per channel: permutations commute with them, a
        # dense transform of the producer's channels does not (its rows take the role "gate")
        t.products.append(x.dims[1])
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
    t.products.append(x.dims[1])  # per-sample statistics over channel groups: no dense transform commutes
    space = t.table.new(x.shape[1])
    t.unify(plain(space), x.dims[1])
    if t.table.split(space, groups) is None:
        t.fix(x.dims[1], f"{t.where()}: channel groups across an existing structure")
    out = _norm_params(t, x, [1], params)
    if isinstance(meta, (list, tuple)):
        return [out] + [opaque_like(m) for m in meta[1:]]
    return out
