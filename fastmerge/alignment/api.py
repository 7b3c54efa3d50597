"""fastmerge.align: one transform per group per model, by any alignment method.

Methods:
    permute          activation matching: LAP on the cross-correlation with the reference
    weight_matching  data-free Git Re-Basin coordinate descent (MergeMany for > 2 models)
    cca              CCA Merge: dense transforms from canonical correlation analysis
    zipit            ZipIt: greedy merging of the joint features of all models

Activation-based methods align the groups that statistics can observe alone (a tap point, one
instance, nothing nested: hidden layers, channels, residual streams). The other groups (attention
heads and their per-head dims, groups without a tap) are aligned by weight matching with the
activation-aligned groups held fixed. CCA and ZipIt produce dense transforms only where they are
exact linear maps (members that are producer rows or consumer columns); groups that also hold
norm parameters or running statistics are permuted instead (ALGORITHMS.md section 4).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from .. import distributed as _distributed
from ..checks import check_models
from ..errors import InvalidArgumentError
from ..spec.transforms import Dense, apply_transforms
from ..spec.types import MergeSpec
from .activation import cca_transform, match_permutation, zipit_matrices
from ..spec.structure import activation_groups, dense_ok
from .weight_matching import identity_perms, weight_matching

METHODS = ("permute", "weight_matching", "cca", "zipit")
logger = logging.getLogger(__name__)


@dataclass
class Alignment:
    """Per model, {group name: transform}: a (count, size) permutation or a Dense transform.
    Model `reference` gets identities. `diagnostics` holds per-group numbers."""

    spec: MergeSpec
    method: str
    reference: int
    transforms: list[dict]
    diagnostics: dict = field(default_factory=dict)

    def apply(self, model_index: int, state: dict) -> dict:
        return apply_transforms(self.spec, state, self.transforms[model_index])


def _float_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items()}


def _distance_from_identity(t) -> float:
    if isinstance(t, Dense):
        eye = torch.eye(t.out.shape[-1], dtype=t.out.dtype, device=t.out.device)
        return float((t.out - eye).norm() / eye.norm())
    return float((t != torch.arange(t.shape[-1], device=t.device)).double().mean())


def align(models: Sequence[torch.nn.Module], method: str = "permute", *, spec: MergeSpec, stats=None,
          data: Iterable | None = None, reference: int = 0, reg: float = 0.1, relative_reg: bool = True,
          alpha: float = 0.5, beta: float = 0.0, max_iter: int = 100, seed: int = 0, merge_many: bool | None = None,
          restarts: int = 1, stats_options: dict | None = None, progress: bool = True,
          distributed: bool | None = None) -> Alignment:
    """Aligns every model to the reference; see _align_local for the arguments.

    Under an initialised torch.distributed process group (``distributed`` None: whenever there is
    one) every rank collects statistics on its shard of `data` (reduced across ranks), rank 0
    computes the alignment and broadcasts it, so all ranks merge identically.
    """
    check_models(models)
    options = dict(spec=spec, reference=reference, reg=reg, relative_reg=relative_reg, alpha=alpha, beta=beta,
                   max_iter=max_iter, seed=seed, merge_many=merge_many, restarts=restarts, progress=progress)
    if distributed is None:
        distributed = _distributed.active()
    if not distributed:
        return _align_local(models, method, stats=stats, data=data, stats_options=stats_options, **options)
    if method in METHODS and method != "weight_matching" and stats is None and data is not None:
        from ..stats import collect_stats

        stats = collect_stats(models, data, spec, groups=activation_groups(spec),  # a collective: every rank
                              pairs="full" if method == "zipit" else "all_to_one", reference=reference,
                              progress=progress, distributed=True, **(stats_options or {}))
    payload = [None]
    if torch.distributed.get_rank() == 0:
        payload = [_align_local(models, method, stats=stats, data=data, stats_options=stats_options, **options)]
    torch.distributed.broadcast_object_list(payload, src=0)
    return payload[0]


_TIE_BREAK = 1e-6  # far below any real correlation difference, far above rounding


def _incoming_weight_similarity(spec: MergeSpec, group, ref_state: dict, state: dict, transforms: dict):
    """(size, size) cosine similarity between the reference's and a model's units, from the rows
    each unit's producer writes (with the model's earlier groups already aligned), or None when the
    group has no plain producer rows."""
    outs = [m for m in group.members if m.role == "out" and m.factors is None and m.tensor in state]
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


def _align_local(models: Sequence[torch.nn.Module], method: str = "permute", *, spec: MergeSpec, stats=None,
                 data: Iterable | None = None, reference: int = 0, reg: float = 0.1, relative_reg: bool = True,
                 alpha: float = 0.5, beta: float = 0.0, max_iter: int = 100, seed: int = 0,
                 merge_many: bool | None = None, restarts: int = 1, stats_options: dict | None = None,
                 progress: bool = True) -> Alignment:
    """Aligns every model to the reference (units of the other models re-ordered or transformed
    into the reference's basis).

    Args:
        models: two or more models of one architecture (the spec's).
        method: one of METHODS.
        spec: the merge spec (fastmerge.trace_spec).
        stats: activation statistics from collect_stats (with pairs="full" for ZipIt); collected
            from `data` when not given (activation methods only).
        reference: the model the others are aligned to.
        reg, relative_reg: CCA regularisation (relative: times the mean unit variance).
        alpha, beta: ZipIt's similarity decay and within-model merge budget.
        max_iter, seed, merge_many, restarts: weight matching options (restarts: coordinate
            descents from different random group orders, the best objective is kept).
    """
    if method not in METHODS:
        raise InvalidArgumentError(f"unknown alignment method {method!r}; choose one of {METHODS}")
    n = len(models)
    if n < 2:
        raise InvalidArgumentError(f"align needs at least two models, got {n}")
    if not 0 <= reference < n:
        raise InvalidArgumentError(f"reference {reference} is outside [0, {n})")
    states = [_float_state(m) for m in models]
    diagnostics: dict = {}
    device = next((v.device for v in states[0].values()), torch.device("cpu"))
    transforms = [dict(identity_perms(spec, device)) for _ in range(n)]
    frozen: dict[str, torch.Tensor] = {}

    if method != "weight_matching":
        groups = activation_groups(spec)
        if stats is None:
            if data is None:
                raise InvalidArgumentError(f"method {method!r} needs activation statistics: pass data= or stats=")
            from ..stats import collect_stats

            stats = collect_stats(models, data, spec, groups=groups, pairs="full" if method == "zipit" else "all_to_one",
                                  reference=reference, progress=progress, **(stats_options or {}))
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
            if method == "cca" and dense_ok(g):
                for i in range(n):
                    if i == reference:
                        continue
                    t, t_inv, r = cca_transform(stats.covariance(g.name, reference, reference),
                                                stats.covariance(g.name, i, i), stats.covariance(g.name, reference, i),
                                                reg=reg, relative=relative_reg,
                                                eigh_xx=stats.covariance_eigh(g.name, reference),
                                                eigh_yy=stats.covariance_eigh(g.name, i))
                    transforms[i][g.name] = Dense(out=t[None], inp=t_inv[None])
                    info.setdefault("canonical_correlations", {})[i] = r
            elif method == "zipit" and dense_ok(g):
                state = stats.states[g.name]
                # the greedy matching is sequential: it runs on the host, whatever the statistics' device
                merge, unmerge = zipit_matrices(state.joint_correlation().cpu().numpy(), n, g.size, alpha=alpha, beta=beta)
                device = state.count.device
                c = g.size
                for i in range(n):
                    # n * M_i: the 1/n of ZipIt's average moves into the uniform combination
                    out = torch.from_numpy(n * merge[:, i * c : (i + 1) * c]).to(device)
                    inp = torch.from_numpy(unmerge[i * c : (i + 1) * c, :]).to(device)
                    transforms[i][g.name] = Dense(out=out[None], inp=inp[None])
            diagnostics[g.name] = info

        if short:
            warnings.warn(f"align({method!r}): {len(short)} group(s) saw fewer samples than units ({short[0]}"
                          f"{', ...' if len(short) > 1 else ''}): their statistics are rank-deficient and the "
                          "alignment leans on regularisation; pass more data", stacklevel=3)
        constant = {name: d["constant_units"] for name, d in diagnostics.items() if d.get("constant_units")}
        if constant:  # dead units: no activation to match on (correlation 0, CCA regularised), reported
            logger.info("align(%r): constant (zero-variance) units on this data: %s", method, constant)

    remaining = [g for g in spec.groups if g.name not in frozen]
    if remaining:
        perms, info = weight_matching(spec, states, reference=reference, max_iter=max_iter, seed=seed,
                                      merge_many=merge_many, restarts=restarts, frozen=frozen)
        for g in remaining:
            for i in range(n):
                transforms[i][g.name] = perms[i][g.name]
        diagnostics["weight_matching"] = info
    for g in spec.groups:
        d = diagnostics.setdefault(g.name, {})
        d["distance_from_identity"] = {i: _distance_from_identity(transforms[i][g.name]) for i in range(n) if i != reference}
    return Alignment(spec=spec, method=method, reference=reference, transforms=transforms, diagnostics=diagnostics)
