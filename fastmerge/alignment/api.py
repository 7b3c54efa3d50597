"""fastmerge.align: one transform per group per model, by any alignment method.

Methods (fastmerge.alignment.METHODS, one module each in fastmerge/alignment/methods/):
    permute          activation matching: LAP on the cross-correlation with the reference
    weight_matching  data-free Git Re-Basin coordinate descent (MergeMany for > 2 models)
    zipit            ZipIt: greedy merging of the joint features of all models
    cca              CCA Merge: dense transforms from canonical correlation analysis

Activation-based methods align the groups that statistics can observe alone (a tap point, one
instance, nothing nested: hidden layers, channels, residual streams). The other groups (attention
heads and their per-head dims, groups without a tap) are aligned by weight matching with the
activation-aligned groups held fixed. CCA and ZipIt produce dense transforms only where they are
exact linear maps (members that are producer rows or consumer columns). BatchNorms that read a
Linear/Conv output are folded into it first (fastmerge.spec.folding: the spec's `folds`), so
BatchNorm networks take dense transforms too, and weight matching compares the affine maps the
layers compute; groups that still hold per-unit parameters (LayerNorm, GroupNorm, a BatchNorm
that cannot be folded) are permuted instead, which the diagnostics record ("fallback") and one
warning names.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch

from .. import distributed as _distributed
from ..batches import first_batch, output_logits, run_model
from ..checks import check_models
from ..errors import InvalidArgumentError
from ..spec.folding import fold_state, folded_spec, unfold_state
from ..spec.residual import ResidualGroup, canonical_spec, canonical_state, residual_groups
from ..spec.structure import activation_groups, head_blocks, statistics_groups
from ..spec.transforms import Dense, apply_transforms
from ..spec.types import MergeSpec
from ..stages import timed
from ..stats import collect_stats
from .activation import match_permutation
from .heads import align_heads
from .query_key import query_key_groups, query_key_rotation
from .methods import AlignmentMethod, WeightMatchingOptions, dense_blockers, get_method
from .weight_matching import identity_perms, weight_matching

logger = logging.getLogger(__name__)


@dataclass
class Alignment:
    """Per model, {group name: transform}: a (count, size) permutation or a Dense transform.
    Model `reference` gets identities. `diagnostics` holds per-group numbers.

    With `folded` (the spec has BatchNorm folds), the transforms act on folded states
    (fastmerge.spec.folding): apply() folds a state, transforms it and unfolds it, each BatchNorm
    taking its output moments mapped through the transform as scale and shift: an ordinary state
    (for a permutation it computes the model's function exactly, in eval mode)."""

    spec: MergeSpec
    method: str
    reference: int
    transforms: list[dict]
    diagnostics: dict = field(default_factory=dict)
    folded: bool = False
    # residual-stream groups aligned in canonical form (fastmerge.spec.residual): apply() rewrites
    # every state in that form first, and the merged state stays in it
    canonical: dict[str, ResidualGroup] = field(default_factory=dict)

    @cached_property
    def transform_spec(self) -> MergeSpec:
        """The spec the transforms land on: the folded or canonical spec."""
        if self.canonical:
            return canonical_spec(self.spec, self.canonical)
        return folded_spec(self.spec) if self.folded else self.spec

    def apply(self, model_index: int, state: dict) -> dict:
        transforms = self.transforms[model_index]
        if self.canonical:
            return apply_transforms(self.transform_spec, canonical_state(self.spec, state, self.canonical), transforms)
        if not self.folded:
            return apply_transforms(self.spec, state, transforms)
        moved = apply_transforms(self.transform_spec, fold_state(self.spec, state), transforms)
        return unfold_state(self.spec, moved, state, transforms)


def _float_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items()}


def _distance_from_identity(t) -> float:
    if isinstance(t, Dense):
        eye = torch.eye(t.out.shape[-1], dtype=t.out.dtype, device=t.out.device)
        return float((t.out - eye).norm() / eye.norm())
    return float((t != torch.arange(t.shape[-1], device=t.device)).double().mean())


def align(models: Sequence[torch.nn.Module], method: str = "permute", *, spec: MergeSpec, stats=None,
          data: Iterable | None = None, reference: int = 0, stats_options: dict | None = None, progress: bool = True,
          distributed: bool | None = None, **options) -> Alignment:
    """Aligns every model to the reference (units of the other models re-ordered or transformed
    into the reference's basis).

    Args:
        models: two or more models of one architecture (the spec's).
        method: a name in fastmerge.alignment.METHODS ("permute", "weight_matching", "zipit", "cca").
        spec: the merge spec (fastmerge.trace_spec).
        stats: activation statistics from collect_stats (with the block pairs the method needs:
            pairs="full" for ZipIt); collected from `data` when not given (activation methods).
        reference: the model the others are aligned to.
        stats_options: options of collect_stats when it runs here (max_batches, max_rows, ...).
        options: the method's options (CCA: reg, relative_reg; ZipIt: alpha, beta) and weight
            matching's (max_iter, seed, merge_many, restarts), which every method uses for the
            groups statistics cannot observe. An option the method does not have is an error.

    Under an initialised torch.distributed process group (``distributed`` None: whenever there is
    one) every rank collects statistics on its shard of `data` (reduced across ranks), rank 0
    computes the alignment and broadcasts it, so all ranks merge identically.
    """
    chosen = get_method(method)
    own, matching = chosen.parse_options(options)
    check_models(models)
    local = dict(spec=spec, data=data, reference=reference, stats_options=stats_options, progress=progress)
    if distributed is None:
        distributed = _distributed.active()
    if not distributed:
        return _align_local(models, chosen, own, matching, stats=stats, **local)
    prepared = None
    if chosen.statistics is not None and stats is None and data is not None:
        # every rank decides on the canonical form (agreeing: one rank's failed check is everyone's)
        # and collects its shard's statistics on the models in that form
        prepared = _residual_plan(models, chosen, own, spec, None, data, distributed=True)
        residual, seen_models, _ = prepared
        seen_spec = canonical_spec(spec, residual) if residual else spec
        stats = collect_stats(seen_models, data, seen_spec, groups=statistics_groups(seen_spec),  # a collective
                              pairs=chosen.statistics, reference=reference, progress=progress, distributed=True,
                              **(stats_options or {}))
    payload = [None]
    if torch.distributed.get_rank() == 0:
        payload = [_align_local(models, chosen, own, matching, stats=stats, prepared=prepared, **local)]
    torch.distributed.broadcast_object_list(payload, src=0)
    return payload[0]


def _as_perm(t):
    """The shape of a transform as permutations (count, size): frozen groups only need their shape."""
    if isinstance(t, Dense):
        return torch.arange(t.out.shape[-1], device=t.out.device).repeat(t.out.shape[0], 1)
    return t


_TIE_BREAK = 1e-6  # far below any real correlation difference, far above rounding


def _incoming_weight_similarity(spec: MergeSpec, group, ref_state: dict, state: dict, transforms: dict):
    """(size, size) cosine similarity between the reference's and a model's units, from the rows
    each unit's producer writes (with the model's earlier groups already aligned), or None when the
    group has no plain producer rows."""
    outs = [m for m in group.members if m.role in ("out", "gate") and m.factors is None and m.tensor in state]
    if not outs:
        return None
    names = sorted({m.tensor for m in outs})
    aligned = apply_transforms(spec, {n: state[n] for n in names}, transforms)

    def rows(source):
        parts = [source[m.tensor].detach().double().movedim(m.axis, 0).reshape(group.size, -1) for m in outs]
        block = torch.cat(parts, dim=1)
        return block / block.norm(dim=1, keepdim=True).clamp_min(1e-300)

    return rows(ref_state) @ rows(aligned).T


def _data_report(stats, group, n: int) -> dict:
    """Samples seen and, per model, the number of constant (zero-variance: dead) units of a group."""
    state = stats.states[group.name]
    report: dict = {"samples": state.num_samples}
    for i in range(n):
        var = state.covariance(i, i).diagonal()
        dead = int((var <= 1e-12 * float(var.max().clamp_min(1e-300))).sum())
        if dead:
            report.setdefault("constant_units", {})[i] = dead
    return report


def _blocked_because(group, blockers: list[str]) -> str:
    """Why a dense method permutes a group instead (the members a dense transform would not move)."""
    gates = [m.tensor for m in group.members if m.role == "gate"]
    if gates:
        return (f"its units ({', '.join(gates[:2])}) are multiplied elementwise by another projection's (a gated MLP, "
                "a squeeze-excitation) or normalised by per-sample or per-batch statistics (InstanceNorm, GroupNorm, a "
                "BatchNorm without running statistics), which no dense transform commutes with")
    return f"holds {', '.join(blockers[:2])}{' ...' if len(blockers) > 2 else ''}, which a dense transform would not move exactly"


def _report_fallbacks(method: str, fallbacks: dict[str, str], diagnostics: dict) -> None:
    """Groups a dense method permuted instead: recorded per group (diagnostics[group]["fallback"])
    and named in one warning."""
    if not fallbacks:
        return
    for name, why in fallbacks.items():
        diagnostics.setdefault(name, {})["fallback"] = why
    names = list(fallbacks)
    first = names[0]
    warnings.warn(f"align({method!r}): {len(names)} group(s) permuted instead of densely transformed "
                  f"({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}); {first}: {fallbacks[first]}; "
                  "diagnostics[group]['fallback'] says why for each", stacklevel=4)


_CANONICAL_TOLERANCE = 1e-4  # relative to the outputs' scale: float32 rounding of the rewritten weights


def _output_change(model, twin, batch, index: int) -> float:
    """max |twin(batch) - model(batch)| relative to the outputs' scale (0 when not comparable)."""
    with torch.no_grad():
        want, got = output_logits(run_model(model, batch, index)), output_logits(run_model(twin, batch, index))
    if not (isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor)):
        return 0.0
    scale = float(want.detach().double().abs().max().clamp_min(1e-30))
    return float((want.detach().double() - got.detach().double()).abs().max()) / scale


def _canonical_models(models, spec: MergeSpec, groups: dict, data) -> tuple[list, str]:
    """Copies of the models in canonical form, checked on the first batch of `data` to compute what
    the models compute; ([], why) when they do not (a per-unit parameter the analysis missed)."""
    batch = first_batch(data, "check the canonical form on")
    copies = []
    for i, model in enumerate(models):
        twin = copy.deepcopy(model)
        twin.load_state_dict(canonical_state(spec, _float_state(model), groups))
        error = _output_change(model, twin, batch, i)
        if not error <= _CANONICAL_TOLERANCE:
            return [], f"the canonical form changed model {i}'s outputs by {error:.2g} (relative)"
        copies.append(twin)
    return copies, ""


def _rotations_exact(model, spec: MergeSpec, groups: list, data, index: int) -> str:
    """"" when random orthogonal maps of the query/key groups keep `model`'s outputs on the first
    batch of `data` (the tracer's structure says they do: this checks it), else why not."""
    if data is None or iter(data) is data:
        return "no re-iterable data to check an orthogonal map of them on: permuted by weight matching"
    generator = torch.Generator().manual_seed(0)
    rotations = {}
    for g in groups:
        q, _ = torch.linalg.qr(torch.randn(g.count, g.size, g.size, dtype=torch.float64, generator=generator))
        rotations[g.name] = Dense(out=q, inp=q.transpose(1, 2))
    twin = copy.deepcopy(model)
    twin.load_state_dict(apply_transforms(spec, _float_state(model), rotations))
    error = _output_change(model, twin, first_batch(data, "check the query/key rotation on"), index)
    if not error <= _CANONICAL_TOLERANCE:
        return f"an orthogonal map of them changed the outputs by {error:.2g} (relative): permuted by weight matching"
    return ""


def _residual_plan(models, method: AlignmentMethod, own, spec: MergeSpec, stats, data, *,
                   distributed: bool = False) -> tuple[dict, list, dict]:
    """(residual groups aligned in canonical form, the models to align (canonical copies when there
    are any), {group: why it keeps a permutation}). Under torch.distributed (a collective) the
    ranks agree: a canonical form that fails its check on one rank's batch is used by none."""
    fallbacks: dict[str, str] = {}  # groups a dense method permutes instead, and why
    if not method.wants_residual(own) or spec.folds:
        return {}, list(models), fallbacks
    residual, refused = residual_groups(spec)
    fallbacks.update({name: f"passes through a norm that cannot be made exact: {why}" for name, why in refused.items()})
    why = ""
    if residual and data is not None and iter(data) is data:
        why = "data is a one-shot iterator (the canonical form is checked on its first batch): pass a list or a DataLoader"
    elif residual and (stats is not None or data is None):
        why = ("the statistics were given (stats=), collected on the models as they are, not in canonical form: "
               "permuted")
    canonical = []
    if residual and not why:
        canonical, why = _canonical_models(models, spec, residual, data)
    if distributed and residual:
        failed = torch.tensor([1.0 if why else 0.0], dtype=torch.float64,
                              device=next((t.device for t in models[0].state_dict().values()), None))
        _distributed.all_reduce_sum_([failed])
        if float(failed) > 0 and not why:
            why = "the canonical form failed its check on another rank's batch: permuted"
    if why or not residual:
        fallbacks.update({name: why for name in residual})
        return {}, list(models), fallbacks
    return residual, canonical, fallbacks


@timed("align")
def _align_local(models: Sequence[torch.nn.Module], method: AlignmentMethod, own, matching: WeightMatchingOptions, *,
                 spec: MergeSpec, stats, data: Iterable | None, reference: int, stats_options: dict | None,
                 progress: bool, prepared: tuple | None = None) -> Alignment:
    """fastmerge.align in one process: `own` and `matching` are the method's parsed options;
    `prepared`: the _residual_plan the statistics were collected with (torch.distributed)."""
    n = len(models)
    if n < 2:
        raise InvalidArgumentError(f"align needs at least two models, got {n}")
    if not 0 <= reference < n:
        raise InvalidArgumentError(f"reference {reference} is outside [0, {n})")
    folded = bool(spec.folds)
    raw_spec = spec
    diagnostics: dict = {}
    residual, models, fallbacks = prepared or _residual_plan(models, method, own, spec, stats, data)
    if residual:
        spec = canonical_spec(spec, residual)
    if folded:  # BatchNorms folded into their producers: dense transforms and weight matching are exact on them
        spec = folded_spec(spec)
    states = [fold_state(raw_spec, _float_state(m)) for m in models]
    device = next((v.device for v in states[0].values()), torch.device("cpu"))
    transforms = [dict(identity_perms(spec, device)) for _ in range(n)]
    frozen: dict[str, torch.Tensor] = {}

    if method.statistics is not None:
        heads = head_blocks(spec)
        groups = activation_groups(spec, heads)
        if stats is None:
            if data is None:
                raise InvalidArgumentError(f"method {method.name!r} needs activation statistics: pass data= or stats=")
            stats = collect_stats(models, data, spec, groups=groups + [h.flat for h in heads],
                                  pairs=method.statistics, reference=reference, progress=progress,
                                  **(stats_options or {}))
        short = []
        for g in groups:
            if g.name not in stats.states:
                raise InvalidArgumentError(f"the statistics have no entry for group {g.name!r}")
            info: dict = _data_report(stats, g, n)
            if info["samples"] < g.size:
                short.append(f"{g.name}: {info['samples']} samples for {g.size} units")
            perms = []
            for i in range(n):
                if i == reference:
                    perms.append(torch.arange(g.size, device=device)[None])
                    continue
                rho = stats.correlation(g.name, reference, i)
                if i in info.get("constant_units", {}) or reference in info.get("constant_units", {}):
                    # dead units correlate with nothing: every pairing of them ties. Break the ties by
                    # their incoming weights, so the result does not depend on how the units happen to
                    # be ordered (the permutation of a function-identical model aligns identically)
                    tie = _incoming_weight_similarity(spec, g, states[reference], states[i], transforms[i])
                    if tie is not None:
                        rho = rho + _TIE_BREAK * tie.to(rho)
                perm, matched = match_permutation(rho)
                perms.append(perm)
                info.setdefault("matched_correlation", {})[i] = matched
            frozen[g.name] = torch.stack(perms)
            for i in range(n):
                transforms[i][g.name] = perms[i]
            blockers = dense_blockers(g) if method.dense is not None else []
            if g.name in residual:
                for i, t in enumerate(method.residual(g, stats, reference=reference, n=n, kind=residual[g.name].kind,
                                                      info=info)):
                    if t is not None:
                        transforms[i][g.name] = t
            elif method.dense is not None and not blockers:
                dense = method.dense(g, stats, reference=reference, n=n, options=own, info=info, perms=perms)
                for i, t in enumerate(dense):
                    if t is not None:
                        transforms[i][g.name] = t
            elif blockers:
                fallbacks.setdefault(g.name, _blocked_because(g, blockers))
            diagnostics[g.name] = info

        for blocks in heads:
            if blocks.flat.name not in stats.states:  # statistics gathered without the heads' features
                continue
            found = align_heads(blocks, stats, reference=reference, n=n, dense=method.dense, dense_options=own,
                                info=diagnostics)
            for group in [blocks.heads, *(g for g, _ in blocks.nested), *(g for g, _ in blocks.shared)]:
                frozen[group.name] = torch.stack([_as_perm(found[i][group.name]) for i in range(n)])
                for i in range(n):
                    transforms[i][group.name] = found[i][group.name]
            innermost = len(blocks.grid) - 1
            for group, level in (*blocks.nested, *blocks.shared):
                info = diagnostics.setdefault(group.name, {})
                if level < innermost:  # whole heads (query heads of a key/value head): they never mix
                    info.setdefault("transform", "permutation (heads do not mix)")
                elif method.dense is not None and info.get("transform") is None:
                    fallbacks[group.name] = ("per-head dims shared by several query heads (grouped-query attention): "
                                             "permuted")

        if short:
            warnings.warn(f"align({method.name!r}): {len(short)} group(s) saw fewer samples than units ({short[0]}"
                          f"{', ...' if len(short) > 1 else ''}): their statistics are rank-deficient and the "
                          "alignment leans on regularisation; pass more data", stacklevel=3)
        constant = {name: d["constant_units"] for name, d in diagnostics.items() if d.get("constant_units")}
        if constant:  # dead units: no activation to match on (correlation 0, CCA regularised), reported
            logger.info("align(%r): constant (zero-variance) units on this data: %s", method.name, constant)

    # query/key dims: orthogonal per head after weight matching (dense methods; query_key.py), once
    # a random rotation of them is seen to keep the reference's outputs
    rotated = ([g for g in query_key_groups(spec) if g.name not in frozen]
               if method.dense is not None and not folded else [])
    why = _rotations_exact(models[reference], spec, rotated, data, reference) if rotated else ""
    if method.dense is not None:
        for g in spec.groups:
            if g.name not in frozen and g not in rotated:
                fallbacks[g.name] = ("not observable by activation statistics (attention heads, nested or "
                                     "untapped groups): permuted by weight matching")
        if why:
            fallbacks.update({g.name: why for g in rotated})
            rotated = []
        _report_fallbacks(method.name, fallbacks, diagnostics)
    remaining = [g for g in spec.groups if g.name not in frozen]
    if remaining:
        # weight matching sees every model with the activation transforms (dense ones included)
        # applied, so the groups left to it are matched on the weights as they will be merged
        if frozen:
            states = [apply_transforms(spec, s, {k: transforms[i][k] for k in frozen}) for i, s in enumerate(states)]
            frozen = {k: torch.stack([torch.arange(v.shape[-1], device=v.device).repeat(v.shape[1], 1)] * n)
                      for k, v in frozen.items()}
        perms, info = weight_matching(spec, states, reference=reference, max_iter=matching.max_iter,
                                      seed=matching.seed, merge_many=matching.merge_many,
                                      restarts=matching.restarts, frozen=frozen, progress=progress)
        for g in remaining:
            for i in range(n):
                transforms[i][g.name] = perms[i][g.name]
        diagnostics["weight_matching"] = info
        if rotated:
            others = {g.name for g in remaining} - {g.name for g in rotated}
            moved = [apply_transforms(spec, s, {k: transforms[i][k] for k in others}) for i, s in enumerate(states)]
            for g in rotated:
                for i in range(n):
                    if i != reference:
                        transforms[i][g.name] = query_key_rotation(g, moved[reference], moved[i], transforms[i][g.name])
                diagnostics.setdefault(g.name, {})["transform"] = "orthogonal (query/key dims: Procrustes on the weights)"
    for g in spec.groups:
        d = diagnostics.setdefault(g.name, {})
        d["distance_from_identity"] = {i: _distance_from_identity(transforms[i][g.name]) for i in range(n) if i != reference}
    return Alignment(spec=raw_spec, method=method.name, reference=reference, transforms=transforms,
                     diagnostics=diagnostics, folded=folded, canonical=residual)
