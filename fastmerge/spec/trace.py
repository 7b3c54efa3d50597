"""trace_spec: derive a model's MergeSpec from its exported ATen graph.

The model is captured with ``torch.export`` (an fx graph of ATen ops: one closed vocabulary for
plain modules, hand-written attention and Hugging Face models alike). Every parameter/buffer axis
starts as its own index space; walking the graph, each op unifies, refines or fixes the spaces of
its operands (see spaces.py and layout.py) by the rule registered for it (rules/, one module per op
family). Model inputs and outputs are fixed, and so is every space an unknown op touches (with a
warning naming the op). What remains free, with at least one tensor on it, becomes a group (emit.py).
"""

from __future__ import annotations

import logging
import operator
import warnings

import torch

from ..checks import tied_names
from ..stages import timed
from .emit import build_spec
from .layout import Layout, fix_layout, opaque, plain, prune_families, size_of, unify_layouts
from .rules import HANDLERS, IGNORED, handles
from .rules.base import _bind, _flatten, _op_name, _shape, opaque_like, replica_like
from .rules.norm import stream_norm
from .spaces import SpaceTable, find
from .trace_types import Info, TapCandidate, TraceResult
from .types import MergeSpec, SpecError

__all__ = ["HANDLERS", "IGNORED", "Info", "TapCandidate", "TraceResult", "handles", "opaque_like", "replica_like",
           "trace_model", "trace_spec"]

log = logging.getLogger(__name__)


_TAP_PREFERENCE = {"Linear": 0, "Conv1d": 0, "Conv2d": 0, "Conv3d": 0, "Conv1D": 0, "ConvTranspose1d": 0,
                   "ConvTranspose2d": 0, "ConvTranspose3d": 0, "LayerNorm": 1, "RMSNorm": 1,
                   "BatchNorm1d": 1, "BatchNorm2d": 1, "BatchNorm3d": 1, "GroupNorm": 1, "InstanceNorm1d": 1,
                   "InstanceNorm2d": 1, "InstanceNorm3d": 1}
@timed("trace")
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
    result = trace_model(model, example_inputs, example_kwargs)
    return build_spec(result, {name: tuple(t.shape) for name, t in model.state_dict().items()})


def trace_model(model: torch.nn.Module, example_inputs: tuple, example_kwargs: dict | None = None) -> TraceResult:
    modes = {name: m.training for name, m in model.named_modules()}
    model.eval()
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if use_cache:  # Hugging Face models: a key/value cache in the output is not exportable (nor needed here)
        config.use_cache = False
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
        if use_cache:
            config.use_cache = use_cache
    return _Tracer(model, program).run()


def _module_paths(node) -> set[str]:
    """The paths of the modules a graph node runs in."""
    return {entry[0] for entry in (node.meta.get("nn_module_stack") or {}).values()}


def _norm_kind(module: torch.nn.Module) -> str | None:
    """"rms" / "layer" for a norm module outside torch.nn (which the aten norm rule sees) that
    computes x / rms(x) * weight (+ bias) or the LayerNorm of x over its last axis, else None."""
    name = type(module).__name__
    if type(module).__module__.startswith("torch.nn") or not name.endswith(("RMSNorm", "LayerNorm")):
        return None
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    if (not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not weight.is_floating_point()
            or weight.device.type == "meta"):  # nothing to compute on the meta device: not recognised
        return None
    width = weight.shape[0]
    x = 10.0 * torch.randn(3, 5, width, generator=torch.Generator().manual_seed(0)).to(weight)  # eps negligible
    try:
        with torch.no_grad():
            y = module(x)
    except Exception:  # noqa: BLE001 - a module that does not take one tensor: not a norm we can use
        return None
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        return None
    shift = bias.detach() if isinstance(bias, torch.Tensor) else 0.0
    xf = x.double()
    candidates = {"rms": xf * xf.pow(2).mean(-1, keepdim=True).rsqrt(),
                  "layer": (xf - xf.mean(-1, keepdim=True)) * xf.var(-1, unbiased=False, keepdim=True).rsqrt()}
    for kind, normed in candidates.items():
        want = normed * weight.detach().double() + (shift.double() if isinstance(shift, torch.Tensor) else shift)
        if (y.double() - want).abs().max() <= 1e-2 * want.abs().max().clamp_min(1e-6):
            return kind
    return None


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
        self.folds: list = []
        self.norms: list = []
        self.products: list = []  # layouts of elementwise products of two projections (gated units)
        self.model = model
        self.state_names = set(model.state_dict().keys())
        sig = program.graph_signature
        self.param_of = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
        # names that share one tensor (tied weights): every alias is a member wherever one is
        self.aliases = {n: names for names in tied_names(model.state_dict(keep_vars=True)) for n in names}

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
        self.mark_gates()
        self.module_norms()
        for op, count in sorted(self.unknown.items()):
            warnings.warn(
                f"fastmerge.trace_spec: unsupported op {op} ({count}x); the axes it touches are left out of the spec",
                stacklevel=3,
            )
        return TraceResult(self.table, self.members, self.roles, self.taps, dict(self.unknown), self.folds, self.norms)

    def mark_gates(self) -> None:
        """Producer rows of units that are multiplied elementwise with another projection's units
        (a gated MLP, a squeeze-excitation) or normalised by per-sample or per-batch statistics
        (InstanceNorm, GroupNorm, a BatchNorm without running statistics) take the role "gate":
        permutations move them, dense transforms do not."""
        roots = {id(find(sp)) for layout in self.products for f in layout for sp in f.spaces()}
        for tensor, axis, space in self.members:
            roles = self.roles.get((tensor, axis))
            if roles and "out" in roles and id(find(space)) in roots:
                roles.add("gate")

    def module_norms(self) -> None:
        """Norm modules written with elementwise ops (Hugging Face's LlamaRMSNorm and kin): a module
        whose class is named *RMSNorm/*LayerNorm and that computes that norm on a test input (checked
        numerically: a variant such as Gemma's (1 + weight) scale is not taken) is recorded like the
        aten norms (StreamNorm), from the graph node its output leaves the module by."""
        recorded = {n.weight for n in self.norms} | {n.bias for n in self.norms}
        candidates = {}
        for path, module in self.model.named_modules():
            weight = f"{path}.weight" if path else "weight"
            if weight not in recorded and weight in self.state_names:
                kind = _norm_kind(module)
                if kind is not None:
                    candidates[path] = (kind, weight, module)
        if not candidates:
            return
        inside: dict[str, list] = {path: [] for path in candidates}
        for node in self.graph.nodes:  # one pass: each node to the candidate modules it runs in
            for path in _module_paths(node):
                if path in inside:
                    inside[path].append(node)
        for path, (kind, weight, module) in candidates.items():
            bias = f"{path}.bias" if f"{path}.bias" in self.state_names else None
            # the module's result: the last of its nodes read outside it (an earlier one is its input,
            # passed on by a no-op dtype cast, e.g. to the residual add)
            outputs = [n for n in inside[path] if any(path not in _module_paths(u) for u in n.users)]
            if not outputs:
                continue
            norm = stream_norm(self, outputs[-1:], kind, weight, bias, int(module.weight.shape[0]))
            if norm is not None:
                self.norms.append(norm)

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

    def tap(self, x: Info, dim: int, weight: Info | None = None) -> None:
        """Records the input of the module this node runs in as a place to observe features.

        nn.MultiheadAttention applies its output projection functionally (no module call a hook
        could see): the input of the linear that reads `<attention>.out_proj.weight` (the heads'
        outputs, concatenated) becomes a tap of kind "heads" on the attention module, which the
        statistics recompute from the module's own inputs (stats/attention.py)."""
        stack = self.node.meta.get("nn_module_stack") or {}
        if not stack or not isinstance(x, Info):
            return
        path, type_name = list(stack.values())[-1]
        cls = str(type_name).rsplit(".", 1)[-1].strip("'>")
        if cls in _TAP_PREFERENCE and path:
            self.taps.append(TapCandidate(_TAP_PREFERENCE[cls], self.order, path, dim, list(x.dims[dim])))
        elif (cls == "MultiheadAttention" and path and isinstance(weight, Info)
              and weight.param == f"{path}.out_proj.weight" and weight.param_axes == (0, 1)):
            self.taps.append(TapCandidate(0, self.order, path, -1, list(x.dims[dim]), kind="heads"))
