"""trace_spec: derive a model's MergeSpec from its exported ATen graph.

The model is captured with ``torch.export`` (an fx graph of ATen ops: one closed vocabulary for
plain modules, hand-written attention and Hugging Face models alike). Every parameter/buffer axis
starts as its own index space; walking the graph, each op unifies, refines or fixes the spaces of
its operands (see spaces.py and layout.py). Model inputs and outputs are fixed, and so is every
space an unknown op touches (with a warning naming the op). What remains free, with at least one
tensor on it, becomes a group (emit.py).
"""

from __future__ import annotations

import logging
import operator
import warnings
from dataclasses import dataclass, field

import torch

from .layout import (Factor, Layout, family, fix_layout, opaque, plain, prune_families, replica, reshape_layout,
                     size_of, unify_layouts)
from .spaces import SpaceTable, find
from .types import MergeSpec, SpecError

log = logging.getLogger(__name__)


@dataclass
class Info:
    """What the tracer knows about one tensor value: a layout per dim."""

    dims: list
    shape: tuple
    param: str | None = None  # state-dict name when the value is a parameter/buffer (or a view of one)
    param_axes: tuple | None = None  # for each dim, the parameter axis it is (None: not an axis of it)


@dataclass
class TapCandidate:
    preference: int  # lower is better
    order: int
    module: str
    dim: int
    layout: Layout


@dataclass
class TraceResult:
    table: SpaceTable
    members: list  # (tensor, axis, space)
    roles: dict  # (tensor, axis) -> set of roles
    taps: list = field(default_factory=list)
    unknown_ops: dict = field(default_factory=dict)


_TAP_PREFERENCE = {"Linear": 0, "Conv1d": 0, "Conv2d": 0, "Conv3d": 0, "Conv1D": 0, "LayerNorm": 1, "RMSNorm": 1,
                   "BatchNorm1d": 1, "BatchNorm2d": 1, "BatchNorm3d": 1, "GroupNorm": 1}


def trace_spec(model: torch.nn.Module, example_inputs: tuple, example_kwargs: dict | None = None) -> MergeSpec:
    """Derives the merge spec of `model` from one traced forward pass.

    Args:
        model: any nn.Module that torch.export can capture; it is traced in eval mode, and every
            submodule's train/eval flag is restored afterwards.
        example_inputs: positional inputs for one forward pass (shapes matter, values do not).
        example_kwargs: keyword inputs (e.g. a tokenizer's attention_mask).

    Returns:
        The MergeSpec: every group of axes that can be permuted together without changing the
        function. Axes that cannot (inputs, logits, anything an unsupported op touches) are left
        out and listed in `spec.fixed` with the reason.

    Raises:
        SpecError: the model cannot be exported; the message says how to write a spec by hand.
    """
    from .emit import build_spec

    result = trace_model(model, example_inputs, example_kwargs)
    return build_spec(result, {name: tuple(t.shape) for name, t in model.state_dict().items()})


def trace_model(model: torch.nn.Module, example_inputs: tuple, example_kwargs: dict | None = None) -> TraceResult:
    modes = {name: m.training for name, m in model.named_modules()}
    model.eval()
    try:
        with torch.no_grad():
            program = torch.export.export(model, tuple(example_inputs), example_kwargs or {}, strict=False)
    except Exception as exc:  # export failures come in many types
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise SpecError(
            f"torch.export could not capture {type(model).__name__} ({type(exc).__name__}: {first_line}); "
            "describe the groups by hand with fastmerge.spec.SpecBuilder or a YAML spec"
        ) from exc
    finally:
        for name, m in model.named_modules():
            m.training = modes[name]
    return _Tracer(model, program).run()


class _Tracer:
    def __init__(self, model: torch.nn.Module, program) -> None:
        self.table = SpaceTable()
        self.program = program
        self.graph = program.graph_module.graph
        self.env: dict = {}
        self.members: list = []
        self.roles: dict = {}
        self.taps: list = []
        self.unknown: dict = {}
        self.state_names = set(model.state_dict().keys())
        sig = program.graph_signature
        self.param_of = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
        # names that share one tensor (tied weights): every alias is a member wherever one is
        by_storage: dict = {}
        for n, t in model.state_dict(keep_vars=True).items():
            key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
            by_storage.setdefault(key, []).append(n)
        self.aliases = {n: names for names in by_storage.values() for n in names if len(names) > 1}

    # ------------------------------------------------------------------ walking
    def run(self) -> TraceResult:
        for order, node in enumerate(self.graph.nodes):
            self.order = order
            if node.op == "placeholder":
                self.env[node] = self.placeholder(node)
            elif node.op == "call_function":
                self.env[node] = self.call(node)
            elif node.op == "output":
                for value in _flatten(self.lookup(node.args)):
                    if isinstance(value, Info):
                        for d in value.dims:
                            fix_layout(self.table, d, "model output")
            elif node.op == "get_attr":
                self.env[node] = self.constant(node)
        for op, count in sorted(self.unknown.items()):
            warnings.warn(
                f"fastmerge.trace_spec: unsupported op {op} ({count}x); the axes it touches are left out of the spec",
                stacklevel=3,
            )
        return TraceResult(self.table, self.members, self.roles, self.taps, dict(self.unknown))

    def lookup(self, value):
        if isinstance(value, torch.fx.Node):
            return self.env.get(value)
        if isinstance(value, (list, tuple)):
            return type(value)(self.lookup(v) for v in value)
        if isinstance(value, dict):
            return {k: self.lookup(v) for k, v in value.items()}
        return value

    def placeholder(self, node) -> Info | None:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return None
        shape = tuple(int(s) for s in val.shape)
        name = self.param_of.get(node.name)
        if name is None or name not in self.state_names or not val.is_floating_point():
            # user inputs, non-persistent buffers, integer buffers: not permutable
            return Info([opaque(n) for n in shape], shape)
        if not node.users:  # e.g. the second name of a tied parameter: export uses the first
            return Info([opaque(n) for n in shape], shape)
        dims = []
        for axis, n in enumerate(shape):
            space = self.table.new(n)
            if n > 1:
                for alias in self.aliases.get(name, [name]):  # tied parameters: one tensor, several names
                    self.members.append((alias, axis, space))
            dims.append(plain(space))
        return Info(dims, shape, param=name, param_axes=tuple(range(len(shape))))

    def constant(self, node) -> Info | None:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            shape = tuple(int(s) for s in val.shape)
            return Info([opaque(n) for n in shape], shape)
        return None

    def call(self, node):
        target = node.target
        if target is operator.getitem:
            container, i = self.lookup(node.args[0]), node.args[1]
            return container[i] if isinstance(container, (list, tuple)) else None
        name = _op_name(target)
        handler = HANDLERS.get(name)
        args = [self.lookup(a) for a in node.args]
        kwargs = {k: self.lookup(v) for k, v in node.kwargs.items()}
        out_meta = node.meta.get("val")
        if handler is None:
            if name in IGNORED:
                return None
            return self.unknown_op(name, args, kwargs, out_meta)
        self.node = node
        self.bound = _bind(target, args, kwargs)
        result = handler(self, args, kwargs, out_meta)
        self.check_shapes(result, out_meta, name)
        return self.prune(result, name)

    def check_shapes(self, value, meta, name):
        """A handler's layouts must match the real shapes; if they ever drift (an op form the
        handler did not expect), the safe answer is to fix what the op touched."""
        if isinstance(value, Info) and isinstance(meta, torch.Tensor):
            shape = _shape(meta)
            ok = len(value.dims) == len(shape) and all(size_of(d) == n for d, n in zip(value.dims, shape))
            if not ok:
                for v in _flatten([self.lookup(a) for a in self.node.args]):
                    if isinstance(v, Info):
                        for d in v.dims:
                            self.fix(d, f"{name}: layout out of step with the shapes")
                for d in value.dims:
                    self.fix(d, f"{name}: layout out of step with the shapes")
                value.dims, value.shape = [opaque(n) for n in shape], shape
        elif isinstance(value, (list, tuple)) and isinstance(meta, (list, tuple)):
            for v, m in zip(value, meta):
                self.check_shapes(v, m, name)

    def prune(self, value, name):
        if isinstance(value, Info):
            value.dims = prune_families(self.table, value.dims, name)
            return value
        if isinstance(value, (list, tuple)):
            return type(value)(self.prune(v, name) for v in value)
        return value

    def unknown_op(self, name, args, kwargs, out_meta):
        self.unknown[name] = self.unknown.get(name, 0) + 1
        for value in _flatten([args, list(kwargs.values())]):
            if isinstance(value, Info):
                for d in value.dims:
                    fix_layout(self.table, d, f"unsupported op {name}")
        return opaque_like(out_meta)

    # ------------------------------------------------------------------ helpers for handlers
    def role(self, info, axis: int, role: str) -> None:
        """Records how a parameter axis is used (for dense transforms), through views of it."""
        if isinstance(info, Info) and info.param is not None and info.shape and info.param_axes is not None:
            param_axis = info.param_axes[axis % len(info.shape)]
            if param_axis is not None:
                for alias in self.aliases.get(info.param, [info.param]):
                    self.roles.setdefault((alias, param_axis), set()).add(role)

    def unify(self, a: Layout, b: Layout) -> Layout:
        return unify_layouts(self.table, a, b, self.where())

    def fix(self, layout: Layout, why: str | None = None) -> None:
        fix_layout(self.table, layout, why or self.where())

    def where(self) -> str:
        return f"{self.node.target} ({self.node.name})"

    def tap(self, x: Info, dim: int) -> None:
        """Records the input of the module this node runs in as a place to observe features."""
        stack = self.node.meta.get("nn_module_stack") or {}
        if not stack or not isinstance(x, Info):
            return
        path, type_name = list(stack.values())[-1]
        cls = str(type_name).rsplit(".", 1)[-1].strip("'>")
        if cls in _TAP_PREFERENCE and path:
            self.taps.append(TapCandidate(_TAP_PREFERENCE[cls], self.order, path, dim, list(x.dims[dim])))


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


def replica_like(meta):
    shape = _shape(meta)
    return Info([replica(n) for n in shape], shape)


def _dim(d: int, ndim: int) -> int:
    return d % ndim if ndim else 0


# ---------------------------------------------------------------------- op handlers
HANDLERS: dict = {}
IGNORED = {"_assert_tensor_metadata", "_assert_async", "_assert_scalar", "sym_constrain_range",
           "sym_constrain_range_for_size", "_local_scalar_dense", "sym_size", "sym_numel", "sym_stride"}


def handles(*names):
    def register(fn):
        for n in names:
            HANDLERS[n] = fn
        return fn

    return register


@handles("relu", "relu_", "gelu", "silu", "sigmoid", "tanh", "hardtanh", "leaky_relu", "elu", "selu", "celu",
         "softplus", "mish", "hardswish", "hardsigmoid", "dropout", "feature_dropout", "alpha_dropout", "clone",
         "contiguous", "alias", "detach", "_to_copy", "to", "type_as", "neg", "abs", "exp", "log", "log1p",
         "expm1", "sqrt", "rsqrt", "square", "reciprocal", "sin", "cos", "erf", "sign", "softmax", "_softmax",
         "log_softmax", "_log_softmax", "lift_fresh_copy", "clamp", "clamp_min", "clamp_max", "round", "floor",
         "ceil", "logical_not", "bitwise_not", "_softmax_backward_data", "nan_to_num")
def _unary(t: _Tracer, args, kwargs, meta):
    """Elementwise in its first operand (softmax acts along one axis but commutes with
    permutations of it): the result is laid out like the input."""
    x = args[0]
    if not isinstance(x, Info):
        return opaque_like(meta)
    others = [v for v in list(args[1:]) + list(kwargs.values()) if isinstance(v, Info)]
    if others:  # clamp(x, min=tensor), ...: elementwise in every tensor operand
        return _broadcast(t, [x] + others, meta)
    return Info([list(d) for d in x.dims], x.shape, x.param, x.param_axes)


@handles("native_dropout")
def _native_dropout(t, args, kwargs, meta):
    out = _unary(t, args, kwargs, meta[0])
    return [out, Info([list(d) for d in out.dims], out.shape)]


@handles("pow")
def _pow(t, args, kwargs, meta):
    if isinstance(args[1], Info):
        return _broadcast(t, args[:2], meta)
    return _unary(t, args, kwargs, meta)


def _broadcast(t: _Tracer, operands, meta, param_role: str = "param") -> Info:
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


@handles("add", "sub", "rsub", "add_", "sub_")
def _add(t, args, kwargs, meta):
    return _broadcast(t, [a for a in args[:2]], meta, param_role="out")


@handles("mul", "div", "mul_", "div_", "maximum", "minimum", "eq", "ne", "gt", "ge", "lt", "le", "logical_and",
         "logical_or", "bitwise_and", "bitwise_or", "__and__", "__or__", "fmod", "remainder", "atan2",
         "floor_divide", "copysign")
def _binary(t, args, kwargs, meta):
    return _broadcast(t, [a for a in args[:2]], meta)


@handles("where", "addcmul", "addcdiv", "lerp")
def _ternary(t, args, kwargs, meta):
    return _broadcast(t, [a for a in args[:3]], meta)


@handles("masked_fill", "masked_fill_")
def _masked_fill(t, args, kwargs, meta):
    return _broadcast(t, [args[0], args[1]] + ([args[2]] if isinstance(args[2], Info) else []), meta)


@handles("zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "new_zeros", "new_ones", "new_full",
         "scalar_tensor", "fill")
def _constant_fill(t, args, kwargs, meta):
    """Same value everywhere: any permutation is consistent with it."""
    return replica_like(meta)


@handles("arange", "empty", "empty_like", "new_empty", "rand", "randn", "rand_like", "randn_like", "randint",
         "tensor", "linspace", "tril", "triu")
def _opaque_creation(t, args, kwargs, meta):
    x = args[0] if args else None
    if isinstance(x, Info):  # tril/triu of features: position-dependent
        for d in x.dims:
            t.fix(d)
    return opaque_like(meta)


# reductions ------------------------------------------------------------------------------
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
         "kthvalue")
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


# shape ops -------------------------------------------------------------------------------
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


def _slice_layout(t: _Tracer, d: Layout, size: int, start: int, stop: int, why: str) -> Layout:
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


def _select_layout(t: _Tracer, x: Info, dim: int, index: int) -> list:
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


# linear algebra --------------------------------------------------------------------------
@handles("linear")
def _linear(t, args, kwargs, meta):
    x, w = args[0], args[1]
    b = args[2] if len(args) > 2 else kwargs.get("bias")
    t.role(w, 0, "out")
    t.role(w, 1, "in")
    t.role(b, 0, "out")
    t.tap(x, -1)
    t.unify(x.dims[-1], w.dims[1])
    out = [list(d) for d in x.dims[:-1]] + [list(w.dims[0])]
    if isinstance(b, Info):
        out[-1] = t.unify(out[-1], b.dims[0])
    return Info(out, _shape(meta))


@handles("addmm")
def _addmm(t, args, kwargs, meta):
    bias, a, b = args[0], args[1], args[2]
    t.role(b, 0, "in")
    t.role(b, 1, "out")
    t.role(bias, -1, "out")
    t.tap(a, -1)
    out = _matmul_dims(t, a, b)
    if isinstance(bias, Info) and bias.shape and bias.shape[-1] > 1:
        out[-1] = t.unify(out[-1], bias.dims[-1])
    return Info(out, _shape(meta))


def _shared_families(t: _Tracer, contracted: list, batch: list) -> list:
    """A contracted axis pairs element (.., e) of one operand with (.., e) of the other for every
    row/column combination; per-block (family) transforms on it are consistent only when the
    block index is a batch dim both operands share. Otherwise the blocks must share one."""
    return prune_families(t.table, contracted, t.where(), present_in=batch)


def _matmul_dims(t: _Tracer, a: Info, b: Info) -> list:
    """Layouts of a @ b with numpy broadcasting of batch dims; the contracted axes unify."""
    if not isinstance(a, Info) or not isinstance(b, Info):
        raise SpecError(f"{t.where()}: matrix product with an operand that is not a tensor")
    a_dims, b_dims = [list(d) for d in a.dims], [list(d) for d in b.dims]
    a_shape, b_shape = list(a.shape), list(b.shape)
    squeeze_a = squeeze_b = False
    if len(a_shape) == 1:
        a_dims, a_shape, squeeze_a = [[]] + a_dims, [1] + a_shape, True
    if len(b_shape) == 1:
        b_dims, b_shape, squeeze_b = b_dims + [[]], b_shape + [1], True
    # batch dims first: they carry the head index that the contracted families are indexed by
    batch_a, batch_b = a_dims[:-2], b_dims[:-2]
    n = max(len(batch_a), len(batch_b))
    batch_a = [[]] * (n - len(batch_a)) + batch_a
    batch_b = [[]] * (n - len(batch_b)) + batch_b
    sa = [1] * (n - len(a_shape[:-2])) + a_shape[:-2]
    sb = [1] * (n - len(b_shape[:-2])) + b_shape[:-2]
    batch = []
    for da, db, na, nb in zip(batch_a, batch_b, sa, sb):
        if na == 1:
            batch.append(db)
        elif nb == 1:
            batch.append(da)
        else:
            batch.append(t.unify(da, db))
    a_dims[-1], b_dims[-2] = _shared_families(t, [a_dims[-1], b_dims[-2]], batch)
    t.unify(a_dims[-1], b_dims[-2])
    out = batch + [a_dims[-2], b_dims[-1]]
    if squeeze_b:
        out.pop(-1)
    if squeeze_a:
        out.pop(-2 if not squeeze_b else -1)
    return out


@handles("mm", "bmm", "matmul")
def _mm(t, args, kwargs, meta):
    a, b = args[0], args[1]
    if isinstance(b, Info) and len(b.shape) >= 2:  # x @ W: W's rows meet x's units
        t.role(b, -2, "in")
        t.role(b, -1, "out")
    if isinstance(a, Info) and len(a.shape) >= 2:  # W @ x
        t.role(a, -2, "out")
        t.role(a, -1, "in")
    return Info(_matmul_dims(t, a, b), _shape(meta))


@handles("baddbmm")
def _baddbmm(t, args, kwargs, meta):
    bias, a, b = args[0], args[1], args[2]
    out = _matmul_dims(t, a, b)
    if isinstance(bias, Info):
        info = _broadcast(t, [Info(out, _shape(meta)), bias], meta)
        return info
    return Info(out, _shape(meta))


@handles("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
         "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
         "_scaled_dot_product_cudnn_attention")
def _sdpa(t, args, kwargs, meta):
    """softmax(q k^T + mask) v: batch dims shared by q, k, v (with K/V heads repeated for GQA),
    q and k dims contracted, keys aligned with values; the result has v's dims."""
    q, k, v = args[0], args[1], args[2]
    out_meta = meta[0] if isinstance(meta, (list, tuple)) else meta
    q_batch, k_batch, v_batch = q.dims[:-2], k.dims[:-2], v.dims[:-2]
    batch = []
    for i, (dq, dk, dv) in enumerate(zip(q_batch, k_batch, v_batch)):
        nq, nk = q.shape[i], k.shape[i]
        if nq != nk and nk > 1 and nq % nk == 0:  # grouped-query attention: K/V heads repeated
            dk = list(dk) + replica(nq // nk)
            dv = list(dv) + replica(nq // nk)
        merged = t.unify(t.unify(list(dq), dk), dv) if nq > 1 else list(dq)
        batch.append(merged)
    qd, kd = _shared_families(t, [list(q.dims[-1]), list(k.dims[-1])], batch)
    t.unify(qd, kd)
    kd2, vd = _shared_families(t, [list(k.dims[-2]), list(v.dims[-2])], batch)
    t.unify(kd2, vd)
    mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
    if isinstance(mask, Info):
        ref = Info(batch + [list(q.dims[-2]), list(k.dims[-2])], tuple(q.shape[:-1]) + (k.shape[-2],))
        _broadcast(t, [ref, mask], torch.empty(ref.shape, device="meta"))
    out = Info(batch + [list(q.dims[-2]), list(v.dims[-1])], _shape(out_meta))
    if isinstance(meta, (list, tuple)):
        return [out] + [opaque_like(m) for m in meta[1:]]
    return out


@handles("conv1d", "conv2d", "conv3d", "convolution", "_convolution")
def _conv(t, args, kwargs, meta):
    x, w = args[0], args[1]
    b = t.bound.get("bias")
    if t.bound.get("transposed", False):
        return t.unknown_op("conv_transpose", args, kwargs, meta)
    groups = t.bound.get("groups", 1)
    out_shape = _shape(meta)
    batched = len(x.shape) == len(w.shape)
    c = 1 if batched else 0  # channel axis
    t.role(w, 0, "out")
    t.role(w, 1, "in")
    t.role(b, 0, "out")
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
    return Info(dims, out_shape)


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


# normalisation ---------------------------------------------------------------------------
def _norm_params(t: _Tracer, x: Info, axes: list, params: list) -> Info:
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
