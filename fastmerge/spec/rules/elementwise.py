"""Elementwise ops: unary, binary and ternary ops, add, pow, dropout, fills and tensor creation."""

from __future__ import annotations

from ..trace_types import Info
from .base import _broadcast, _op_name, handles, opaque_like, replica_like


@handles("relu", "relu_", "gelu", "silu", "sigmoid", "tanh", "hardtanh", "leaky_relu", "elu", "selu", "celu",
         "softplus", "mish", "hardswish", "hardsigmoid", "dropout", "feature_dropout", "alpha_dropout", "clone",
         "contiguous", "alias", "detach", "_to_copy", "to", "type_as", "neg", "abs", "exp", "log", "log1p",
         "expm1", "sqrt", "rsqrt", "square", "reciprocal", "sin", "cos", "erf", "sign", "softmax", "_softmax",
         "log_softmax", "_log_softmax", "lift_fresh_copy", "clamp", "clamp_min", "clamp_max", "round", "floor",
         "ceil", "logical_not", "bitwise_not", "_softmax_backward_data", "nan_to_num", "relu6", "threshold",
         "softsign", "tanhshrink", "hardshrink", "softshrink", "erfc", "exp2", "tan", "atan", "sinh", "cosh",
         "asinh", "atanh", "trunc", "frac", "log2", "log10", "logit", "sgn")
def _unary(t, args, kwargs, meta):
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


@handles("prelu", "_prelu_kernel")
def _prelu(t, args, kwargs, meta):
    """PReLU: elementwise, with one learned slope per channel (axis 1; the last of a 1-D input) or
    one shared slope. Per-channel slopes are per-unit parameters: permutations move them."""
    x, w = args[0], args[1]
    if not isinstance(x, Info):
        return opaque_like(meta)
    if isinstance(w, Info) and w.shape and w.shape[0] > 1:
        channel = 1 if len(x.shape) > 1 else 0
        t.role(w, 0, "param")
        t.unify(x.dims[channel], w.dims[0])
    return Info([list(d) for d in x.dims], x.shape, x.param, x.param_axes)


@handles("pow")
def _pow(t, args, kwargs, meta):
    if isinstance(args[1], Info):
        return _broadcast(t, args[:2], meta)
    return _unary(t, args, kwargs, meta)


@handles("add", "sub", "rsub", "add_", "sub_")
def _add(t, args, kwargs, meta):
    return _broadcast(t, [a for a in args[:2]], meta, param_role="out")


@handles("mul", "div", "mul_", "div_", "maximum", "minimum", "eq", "ne", "gt", "ge", "lt", "le", "logical_and",
         "logical_or", "bitwise_and", "bitwise_or", "__and__", "__or__", "fmod", "remainder", "atan2",
         "floor_divide", "copysign")
def _binary(t, args, kwargs, meta):
    out = _broadcast(t, [a for a in args[:2]], meta)
    if _op_name(t.node.target) in ("mul", "mul_") and _two_projections(t.node):
        t.products.extend(out.dims)  # every axis: the units are the last (a Linear's) or the channels (a Conv's)
    return out


# single-input ops a projection's output may pass through before it is multiplied (an activation, a
# reshape, an eval-mode BatchNorm, whose other inputs are its parameters and statistics)
def _projection_of(node, depth: int = 12):
    """The Linear/Conv node `node` computes from through single-input elementwise ops, or None."""
    for _ in range(depth):
        if not hasattr(node, "op") or node.op != "call_function":
            return None
        name = _op_name(node.target)
        if name in ("linear", "addmm", "conv1d", "conv2d", "conv3d", "convolution", "matmul"):
            return node
        inputs = [a for a in node.args if hasattr(a, "op")]
        through_norm = "batch_norm" in name and bool(node.args) and hasattr(node.args[0], "op")
        if not through_norm and (len(inputs) != 1 or inputs[0] is not node.args[0]):
            return None
        node = node.args[0]
    return None


def _two_projections(node) -> bool:
    """An elementwise product of two different projections' outputs (a gated MLP's gate and up
    branches): a dense transform of their units is not a transform of the product."""
    a, b = (node.args[0], node.args[1]) if len(node.args) > 1 else (None, None)
    pa, pb = _projection_of(a), _projection_of(b)
    return pa is not None and pb is not None and pa is not pb


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
