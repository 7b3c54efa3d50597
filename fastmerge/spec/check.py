"""check_spec: prove on real inputs that a spec's transforms leave the model's function unchanged."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from .transforms import apply_permutations
from .types import MergeSpec, SpecError


@dataclass
class CheckReport:
    groups: int
    trials: int
    max_abs_diff: float
    max_rel_diff: float
    per_group: dict = field(default_factory=dict)  # name -> max relative difference (when isolated)

    def __str__(self) -> str:
        return (f"check_spec: {self.groups} groups, {self.trials} random trials, outputs unchanged "
                f"(max abs diff {self.max_abs_diff:.2e}, max rel diff {self.max_rel_diff:.2e})")


def _outputs(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict) or hasattr(value, "items"):
        return [t for v in value.values() for t in _outputs(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _outputs(v)]
    return []


def _never_identity(perms: dict) -> dict:
    """A drawn identity would test nothing: shift such instances by one position."""
    out = {}
    for name, p in perms.items():
        p = p.clone()
        size = p.shape[-1]
        if size >= 2:
            same = (p == torch.arange(size)).all(dim=-1)
            p[same] = torch.roll(torch.arange(size), 1)
        out[name] = p
    return out


def _to_double(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.double()
    if isinstance(value, (list, tuple)):
        return type(value)(_to_double(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_double(v) for k, v in value.items()}
    return value


def check_spec(
    spec: MergeSpec,
    model: torch.nn.Module,
    example_inputs: tuple,
    example_kwargs: dict | None = None,
    *,
    trials: int = 3,
    seed: int = 0,
    rtol: float = 1e-9,
) -> CheckReport:
    """Applies random permutations allowed by the spec (every group at once, each instance its own
    permutation: head swaps plus within-head permutations) and checks, in float64, that the
    model's outputs do not change.

    Raises:
        SpecError: the spec does not fit the model, or the outputs changed; then every group is
            tried alone and the message names the first one (in spec order) that changes them.
    """
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    spec.validate(shapes)
    reference = copy.deepcopy(model).double().eval()
    inputs = _to_double(tuple(example_inputs))
    kwargs = _to_double(dict(example_kwargs or {}))
    state = reference.state_dict()
    with torch.no_grad():
        expected = _outputs(reference(*inputs, **kwargs))
    scale = max((e.abs().max().item() for e in expected if e.numel() and e.is_floating_point()), default=1.0)
    probe = copy.deepcopy(reference)
    gen = torch.Generator().manual_seed(seed)

    def run(perms) -> tuple[float, float]:
        probe.load_state_dict(apply_permutations(spec, state, perms))
        with torch.no_grad():
            got = _outputs(probe(*inputs, **kwargs))
        if any(not torch.equal(g, e) for g, e in zip(got, expected) if not g.is_floating_point()):
            return float("inf"), float("inf")  # integer/bool outputs must match exactly
        diff = max(((g - e).abs().max().item() for g, e in zip(got, expected)
                    if g.numel() and g.is_floating_point()), default=0.0)
        return diff, diff / max(scale, 1e-300)

    max_abs = max_rel = 0.0
    for _ in range(trials):
        perms = _never_identity(spec.random_permutations(gen))
        abs_diff, rel_diff = run(perms)
        max_abs, max_rel = max(max_abs, abs_diff), max(max_rel, rel_diff)
        if rel_diff > rtol:
            for g in spec.groups:
                alone_abs, alone_rel = run({g.name: perms[g.name]})
                if alone_rel > rtol:
                    raise SpecError(
                        f"check_spec: permuting group {g.name!r} ({g.size} units x {g.count}) changes the model's "
                        f"outputs (max abs diff {alone_abs:.3e}, relative {alone_rel:.3e}); its members "
                        f"{[f'{m.tensor}:{m.axis}' for m in g.members]} do not move together with everything "
                        "that depends on them (a model that computes in float32 internally needs a larger rtol)"
                    )
            raise SpecError(
                f"check_spec: the groups pass one by one but changing them together alters the outputs "
                f"(relative diff {rel_diff:.3e}): two groups overlap or interact"
            )
    return CheckReport(groups=len(spec.groups), trials=trials, max_abs_diff=max_abs, max_rel_diff=max_rel)
