"""MergeSpec to and from YAML (hand-editable), and SpecBuilder for writing a spec in code.

Format (defaults omitted when written)::

    format: fastmerge-spec/1
    groups:
    - name: fc1
      size: 32
      count: 1
      tap: {module: fc2, kind: input, arg: 0, dim: -1}
      members:
      - {tensor: fc1.weight, axis: 0, role: out}
      - {tensor: fc1.bias, axis: 0, role: out}
      - {tensor: fc2.weight, axis: 1, role: in}
      - {tensor: attn.qkv.weight, axis: 0, role: out, offset: 32, factors: [4, 8], unit: 1,
         instance: [0], select: {0: [0, 1]}}
    fixed:
    - {tensor: fc1.weight, axis: 1, reason: model input}
    folds:
    - {producer: conv1.weight, producer_bias: null, norm: bn1, eps: 1.0e-05}
    norms:
    - {kind: layer, weight: ln.weight, bias: ln.bias, readers: [[fc.weight, fc.bias, 1]]}
    - {kind: layer, weight: ln_f.weight, bias: ln_f.bias, obstacle: the LM head is tied}
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

import torch
import yaml

from ..io.atomic import write_text_atomic
from .types import ROLES, TAP_KINDS, Group, Member, MergeSpec, NormFold, SpecError, StreamNorm, TapPoint

FORMAT = "fastmerge-spec/1"
_MEMBER_KEYS = {"tensor", "axis", "role", "factors", "unit", "instance", "select", "offset"}
_TAP_KEYS = {"module", "kind", "arg", "dim", "factors", "unit", "instance", "select", "offset"}
_GROUP_KEYS = {"name", "size", "count", "tap", "members"}


class _Flow(dict):
    """A mapping written on one line."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Flow, lambda d, data: d.represent_mapping("tag:yaml.org,2002:map", data.items(), flow_style=True))


def _layout_fields(obj, out: dict) -> dict:
    if obj.factors is not None:
        out["factors"] = list(obj.factors)
    if obj.unit:
        out["unit"] = obj.unit
    if obj.instance:
        out["instance"] = list(obj.instance)
    if obj.select:
        out["select"] = {lvl: list(values) for lvl, values in obj.select}
    return out


def spec_to_dict(spec: MergeSpec) -> dict:
    groups = []
    for g in spec.groups:
        entry = {"name": g.name, "size": g.size}
        if g.count != 1:
            entry["count"] = g.count
        if g.tap is not None:
            tap = {"module": g.tap.module, "kind": g.tap.kind, "arg": g.tap.arg, "dim": g.tap.dim}
            if g.tap.offset:
                tap["offset"] = g.tap.offset
            entry["tap"] = _Flow(_layout_fields(g.tap, tap))
        members = []
        for m in g.members:
            fields = {"tensor": m.tensor, "axis": m.axis, "role": m.role}
            if m.offset:
                fields["offset"] = m.offset
            members.append(_Flow(_layout_fields(m, fields)))
        entry["members"] = members
        groups.append(entry)
    out = {"format": FORMAT, "groups": groups}
    if spec.fixed:
        out["fixed"] = [_Flow(tensor=t, axis=a, reason=r) for t, a, r in spec.fixed]
    if spec.folds:
        out["folds"] = [_Flow(producer=f.producer, producer_bias=f.producer_bias, norm=f.norm, eps=f.eps)
                        for f in spec.folds]
    if spec.norms:
        out["norms"] = [_Flow({"kind": n.kind, "weight": n.weight, "bias": n.bias,
                               **({"obstacle": n.obstacle} if n.obstacle else {"readers": [list(r) for r in n.readers]})})
                        for n in spec.norms]
    return out


def spec_to_yaml(spec: MergeSpec) -> str:
    return yaml.dump(spec_to_dict(spec), Dumper=_Dumper, sort_keys=False, width=120)


def _check_keys(where: str, data, allowed: set) -> None:
    if not isinstance(data, Mapping):
        raise SpecError(f"{where}: expected a mapping, got {type(data).__name__}")
    unknown = set(data) - allowed
    if unknown:
        raise SpecError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")


def _int(where: str, value, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{where}: expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise SpecError(f"{where}: must be >= {minimum}, got {value}")
    return value


def _ints(where: str, value) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise SpecError(f"{where}: expected a list of integers, got {value!r}")
    return tuple(_int(where, v) for v in value)


def _layout_from(where: str, data: Mapping) -> dict:
    out = {}
    if "factors" in data:
        out["factors"] = _ints(f"{where}.factors", data["factors"])
    if "unit" in data:
        out["unit"] = _int(f"{where}.unit", data["unit"], minimum=0)
    if "instance" in data:
        out["instance"] = _ints(f"{where}.instance", data["instance"])
    if "select" in data:
        sel = data["select"]
        if not isinstance(sel, Mapping):
            raise SpecError(f"{where}.select: expected a mapping level -> values, got {sel!r}")
        out["select"] = tuple((_int(f"{where}.select", k, minimum=0), _ints(f"{where}.select[{k}]", v))
                              for k, v in sorted(sel.items()))
    return out


def spec_from_dict(data: Mapping) -> MergeSpec:
    """Builds a MergeSpec from parsed YAML, rejecting unknown keys and malformed values."""
    _check_keys("spec", data, {"format", "groups", "fixed", "folds", "norms"})
    if data.get("format", FORMAT) != FORMAT:
        raise SpecError(f"spec: unsupported format {data.get('format')!r}, expected {FORMAT!r}")
    groups_data = data.get("groups")
    if not isinstance(groups_data, list):
        raise SpecError("spec: 'groups' must be a list")
    groups = []
    for gi, gd in enumerate(groups_data):
        where = f"groups[{gi}]"
        _check_keys(where, gd, _GROUP_KEYS)
        for key in ("name", "size", "members"):
            if key not in gd:
                raise SpecError(f"{where}: missing {key!r}")
        name = gd["name"]
        if not isinstance(name, str) or not name:
            raise SpecError(f"{where}.name: expected a non-empty string, got {name!r}")
        where = f"group {name!r}"
        members = []
        if not isinstance(gd["members"], list) or not gd["members"]:
            raise SpecError(f"{where}: 'members' must be a non-empty list")
        for mi, md in enumerate(gd["members"]):
            mwhere = f"{where}, members[{mi}]"
            _check_keys(mwhere, md, _MEMBER_KEYS)
            if "tensor" not in md or "axis" not in md:
                raise SpecError(f"{mwhere}: needs 'tensor' and 'axis'")
            if not isinstance(md["tensor"], str):
                raise SpecError(f"{mwhere}.tensor: expected a string, got {md['tensor']!r}")
            role = md.get("role", "param")
            if role not in ROLES:
                raise SpecError(f"{mwhere}.role: must be one of {ROLES}, got {role!r}")
            members.append(Member(md["tensor"], _int(f"{mwhere}.axis", md["axis"], minimum=0), role=role,
                                  offset=_int(f"{mwhere}.offset", md.get("offset", 0), minimum=0),
                                  **_layout_from(mwhere, md)))
        tap = None
        if gd.get("tap") is not None:
            td = gd["tap"]
            _check_keys(f"{where}.tap", td, _TAP_KEYS)
            if "module" not in td or not isinstance(td["module"], str):
                raise SpecError(f"{where}.tap: needs a 'module' name")
            kind = td.get("kind", "input")
            if kind not in TAP_KINDS:
                raise SpecError(f"{where}.tap.kind: must be one of {TAP_KINDS}, got {kind!r}")
            tap = TapPoint(module=td["module"], kind=kind, arg=_int(f"{where}.tap.arg", td.get("arg", 0), minimum=0),
                           dim=_int(f"{where}.tap.dim", td.get("dim", -1)),
                           offset=_int(f"{where}.tap.offset", td.get("offset", 0), minimum=0),
                           **_layout_from(f"{where}.tap", td))
        groups.append(Group(name=name, size=_int(f"{where}.size", gd["size"], minimum=1), members=tuple(members),
                            count=_int(f"{where}.count", gd.get("count", 1), minimum=1), tap=tap))
    fixed = []
    fixed_data = data.get("fixed") or []
    if not isinstance(fixed_data, list):
        raise SpecError(f"spec: 'fixed' must be a list, got {fixed_data!r}")
    for fi, fd in enumerate(fixed_data):
        _check_keys(f"fixed[{fi}]", fd, {"tensor", "axis", "reason"})
        fixed.append((str(fd.get("tensor")), _int(f"fixed[{fi}].axis", fd.get("axis", 0)), str(fd.get("reason", ""))))
    return MergeSpec(groups=groups, fixed=fixed, folds=_folds_from(data.get("folds") or []),
                     norms=_norms_from(data.get("norms") or []))


def _norms_from(data) -> list[StreamNorm]:
    if not isinstance(data, list):
        raise SpecError(f"spec: 'norms' must be a list, got {data!r}")
    norms = []
    for i, nd in enumerate(data):
        where = f"norms[{i}]"
        _check_keys(where, nd, {"kind", "weight", "bias", "readers", "obstacle"})
        if nd.get("kind") not in ("layer", "rms"):
            raise SpecError(f"{where}.kind: expected 'layer' or 'rms', got {nd.get('kind')!r}")
        names = [nd.get("weight"), nd.get("bias")]
        if any(n is not None and not isinstance(n, str) for n in names):
            raise SpecError(f"{where}: 'weight' and 'bias' must be tensor names or null")
        obstacle = nd.get("obstacle", "")
        if not isinstance(obstacle, str):
            raise SpecError(f"{where}.obstacle: expected a sentence, got {obstacle!r}")
        readers = nd.get("readers") or []
        if not isinstance(readers, list) or not all(
                isinstance(r, list) and len(r) == 3 and isinstance(r[0], str) and (r[1] is None or isinstance(r[1], str))
                and r[2] in (0, 1) and not isinstance(r[2], bool) for r in readers):
            raise SpecError(f"{where}.readers: expected a list of [weight, bias or null, input axis 0 or 1]")
        norms.append(StreamNorm(nd["kind"], names[0], names[1], tuple(tuple(r) for r in readers), obstacle))
    return norms


def _folds_from(data) -> list[NormFold]:
    if not isinstance(data, list):
        raise SpecError(f"spec: 'folds' must be a list, got {data!r}")
    folds = []
    for i, fd in enumerate(data):
        where = f"folds[{i}]"
        _check_keys(where, fd, {"producer", "producer_bias", "norm", "eps"})
        bias, eps = fd.get("producer_bias"), fd.get("eps", 1e-5)
        if not isinstance(fd.get("producer"), str) or not isinstance(fd.get("norm"), str):
            raise SpecError(f"{where}: 'producer' and 'norm' must be names (strings)")
        if bias is not None and not isinstance(bias, str):
            raise SpecError(f"{where}.producer_bias: expected a tensor name or null, got {bias!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < 1:
            raise SpecError(f"{where}.eps: expected a number in [0, 1), got {eps!r}")
        folds.append(NormFold(fd["producer"], bias, fd["norm"], float(eps)))
    return folds


def spec_from_yaml(text: str, shapes: Mapping[str, Sequence[int]] | None = None) -> MergeSpec:
    """Parses a YAML spec; with `shapes` ({tensor: shape}, e.g. from a state dict) it is also
    validated against the model (unknown tensors, wrong sizes: SpecError)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"spec: not valid YAML ({exc})") from None
    spec = spec_from_dict(data if data is not None else {})
    if shapes is not None:
        spec.validate(shapes)
    return spec


def save_spec(spec: MergeSpec, path: str | os.PathLike) -> None:
    """Writes the YAML atomically (temporary file in the same folder, then rename)."""
    write_text_atomic(path, spec_to_yaml(spec))


def load_spec(path: str | os.PathLike, model: torch.nn.Module | None = None) -> MergeSpec:
    """Reads a YAML spec; validates it against `model`'s state dict when given."""
    with open(path) as f:
        text = f.read()
    shapes = None if model is None else {n: tuple(t.shape) for n, t in model.state_dict().items()}
    return spec_from_yaml(text, shapes)


MemberLike = Member | tuple


class SpecBuilder:
    """Writes a spec by hand, for models torch.export cannot capture.

    Example:
        >>> b = SpecBuilder(model)
        >>> b.add("hidden", [("fc1.weight", 0, "out"), ("fc1.bias", 0, "out"), ("fc2.weight", 1, "in")],
        ...       tap=TapPoint("fc2"))
        >>> spec = b.build()          # validated against the model
    """

    def __init__(self, model_or_shapes: torch.nn.Module | Mapping[str, Sequence[int]]) -> None:
        if isinstance(model_or_shapes, torch.nn.Module):
            self.shapes = {n: tuple(t.shape) for n, t in model_or_shapes.state_dict().items()}
        else:
            self.shapes = {n: tuple(s) for n, s in model_or_shapes.items()}
        self.groups: list[Group] = []

    def add(self, name: str, members: Iterable[MemberLike], *, size: int | None = None, count: int = 1,
            tap: TapPoint | None = None) -> SpecBuilder:
        """Adds a group; tuples are (tensor, axis) or (tensor, axis, role). The size defaults to the
        first member's unit level (the whole axis for plain members)."""
        ms = [m if isinstance(m, Member) else Member(m[0], m[1], role=m[2] if len(m) > 2 else "param") for m in members]
        if not ms:
            raise SpecError(f"group {name!r}: needs at least one member")
        if size is None:
            first = ms[0]
            if first.tensor not in self.shapes:
                raise SpecError(f"group {name!r}: the model has no tensor {first.tensor!r}")
            size = first.grid(self.shapes[first.tensor][first.axis])[first.unit]
        self.groups.append(Group(name=name, size=size, count=count, members=tuple(ms), tap=tap))
        return self

    def build(self) -> MergeSpec:
        spec = MergeSpec(groups=list(self.groups))
        spec.validate(self.shapes)
        return spec
