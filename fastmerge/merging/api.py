"""fastmerge.merge: align models from different initialisations and combine them into one."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .. import distributed
from ..alignment import METHODS as ALIGNMENT_METHODS
from ..alignment import align as align_models
from ..batches import first_batch
from ..checks import check_models
from ..errors import InvalidArgumentError
from ..ops import combine
from ..spec.cache import cached_trace_spec
from ..spec.types import MergeSpec
from ..stages import timed
from ..stats.outputs import OutputMoments
from .np_merge import np_merge
from .repair import has_batch_norm, repair, repair_points, reset_batch_norm


def merge_methods() -> tuple[str, ...]:
    """What merge() takes as `method`: "average" (no alignment), every alignment method (align,
    then average), and "np_merge" (align with `align_method`, then learn the coefficients)."""
    return ("average", *ALIGNMENT_METHODS, "np_merge")


MERGE_METHODS = merge_methods()  # as registered at import; merge() checks the live registry
REPAIRS = ("auto", "none", "reset", "repair")
@timed("combine")
def combine_states(states: Sequence[dict], weights: Sequence[float], reference: int = 0) -> dict:
    """Weighted sum of the floating tensors of several state dicts (one fused op call); integer
    buffers (counters, ids) are taken from the reference."""
    names = list(states[0])
    floating = [k for k in names if states[0][k].is_floating_point()]
    merged = combine([[s[k] for k in floating] for s in states], weights=list(weights))
    out = dict(zip(floating, merged))
    for k in names:
        if k not in out:
            out[k] = states[reference][k].clone()
    return {k: out[k] for k in names}


def _spec(models, spec, *, data, example_inputs, reference) -> MergeSpec:
    """The given spec, or the reference model's traced on example_inputs or the first batch."""
    if spec is not None:
        return spec
    if example_inputs is not None:
        args, kwargs = tuple(example_inputs), {}
    elif data is not None:
        args, kwargs, _ = first_batch(data, "trace the model with")
    else:
        raise InvalidArgumentError("merge needs data= or example_inputs= to trace the model's spec")
    return cached_trace_spec(models[reference], args, kwargs)


def _align(models, method, *, spec, data, example_inputs, reference, progress, align_options):
    spec = _spec(models, spec, data=data, example_inputs=example_inputs, reference=reference)
    return align_models(models, method, spec=spec, data=data, reference=reference, progress=progress,
                        **align_options)


def _align_and_measure(models, method, *, spec, data, example_inputs, reference, progress, align_options):
    """The alignment, and the parents' output moments at the repair points gathered during its
    statistics pass (one pass over the data less): (alignment, per-parent moments), the moments None
    when the pass did not run every model (REPAIR then measures them itself)."""
    spec = _spec(models, spec, data=data, example_inputs=example_inputs, reference=reference)
    points = repair_points(spec, models[reference])
    with OutputMoments(models, [p.path for p in points]) as moments:
        alignment = align_models(models, method, spec=spec, data=data, reference=reference, progress=progress,
                                 **align_options)
    missing = torch.tensor([0.0 if moments.seen() else 1.0], dtype=torch.float64,
                           device=next((t.device for t in models[reference].state_dict().values()), None))
    distributed.all_reduce_sum_([missing])  # every rank takes the same path (result() is a collective)
    if float(missing) > 0 or not points:
        return alignment, None
    return alignment, moments.result()


def _np_merge(models, states, *, data, spec, example_inputs, reference, alignment, align_method, val_data,
              np_options, return_alignment, progress, align_options, repair_mode):
    """Align with `align_method`, then learn per-parameter coefficients (fastmerge.np_merge)."""
    if data is None:
        raise InvalidArgumentError("method 'np_merge' needs data= (training batches of (inputs, targets))")
    if alignment is None and align_method != "average":
        alignment = _align(models, align_method, spec=spec, data=data, example_inputs=example_inputs,
                           reference=reference, progress=progress, align_options=align_options)
    aligned = [alignment.apply(i, s) if alignment is not None else s for i, s in enumerate(states)]
    batch_norm = has_batch_norm(models[reference])
    if repair_mode == "reset" and not batch_norm:
        raise InvalidArgumentError("repair_mode='reset' needs BatchNorm layers; use 'repair' for this model")
    parents = []
    for s in aligned:
        p = copy.deepcopy(models[reference])
        p.load_state_dict(s)
        parents.append(p)
    # a distilled ensemble is of the models as given: a dense alignment changes the aligned parents' functions
    options = {"reset_bn": repair_mode in ("auto", "reset", "repair"), "teachers": models, **np_options}
    result = np_merge(parents, data, val_data=val_data, progress=progress, **options)
    if repair_mode == "repair":  # REPAIR of the learned merge towards the parents' moments (uniform weights)
        spec = alignment.spec if alignment is not None else _spec(models, spec, data=data,
                                                                  example_inputs=example_inputs, reference=reference)
        repair(result.model, models, spec, data, transforms=alignment.transforms if alignment is not None else None)
    return (result.model, alignment) if return_alignment else result.model


def _repair_from_statistics(method, repair_mode, repair_batches, align_options, data) -> bool:
    """Whether REPAIR's targets can come from the alignment's own statistics pass: REPAIR asked for,
    an activation method collecting statistics here, over the same batches REPAIR would use."""
    limits = align_options.get("stats_options") or {}
    return (repair_mode == "repair" and data is not None and repair_batches is None
            and ALIGNMENT_METHODS[method].statistics is not None and align_options.get("stats") is None
            and not any(limits.get(k) is not None for k in ("max_batches", "max_samples")))


def merge(models: Sequence[nn.Module], method: str = "permute", *, data: Iterable | None = None,
          spec: MergeSpec | None = None, example_inputs: tuple | None = None, weights: Sequence[float] | None = None,
          repair_mode: str = "auto", reference: int = 0, alignment=None, repair_batches: int | None = None,
          return_alignment: bool = False, progress: bool = True, align_method: str = "permute",
          val_data: Iterable | None = None, np_options: dict | None = None, **align_options):
    """A new model merging `models` (which are left untouched).

    Args:
        models: two or more models with one architecture, trained from any initialisations.
        method: one of merge_methods(): "average" (no alignment), an alignment method of
            fastmerge.alignment.METHODS (align, then average), or "np_merge".
        data: batches for activation statistics, BatchNorm reset and REPAIR (an iterable or a
            DataLoader yielding inputs, (inputs, targets) or dicts of keyword inputs).
        spec: the merge spec; traced from the reference model when not given.
        example_inputs: inputs for tracing when there is no data (weight matching).
        weights: per-model combination weights (default uniform).
        repair_mode: "auto" (reset BatchNorm statistics when the model has BatchNorm and data is
            given), "none", "reset", or "repair" (REPAIR: every unit moved to the weighted mean and
            std of the parents' units mapped through their transforms; on BatchNorm networks the
            BatchNorms take those as scale and shift before their reset). On BatchNorm networks
            aligned folded (Alignment.folded) the BatchNorms' scale and shift come from the
            parents' BatchNorm parameters mapped the same way (Alignment.apply) unless "repair"
            measures them. With
            method="np_merge": "none" keeps the BatchNorm statistics, "auto"/"reset" reset them
            (and score every validation check with fresh ones), "repair" also REPAIRs the result.
        alignment: a precomputed fastmerge.align result to reuse.
        align_method: for method="np_merge", the alignment method first applied ("average": none);
            `align=` is still accepted for it (deprecated: it shadowed fastmerge.align).
        val_data: for method="np_merge", held-out batches to pick the step count on.
        np_options: for method="np_merge", options of fastmerge.np_merge (steps, lr, granularity,
            mode...).
        align_options: passed to fastmerge.align (reg, alpha, beta, max_iter, seed, stats...).

    Returns:
        The merged model (eval mode), or (model, alignment) with return_alignment=True.
    """
    if "align" in align_options:
        warnings.warn("merge(align=...) is now merge(align_method=...)", DeprecationWarning, stacklevel=2)
        align_method = align_options.pop("align")
    if method not in merge_methods():
        raise InvalidArgumentError(f"unknown merge method {method!r}; choose one of {merge_methods()}")
    if repair_mode not in REPAIRS:
        raise InvalidArgumentError(f"repair_mode must be one of {REPAIRS}, got {repair_mode!r}")
    n = len(models)
    if n < 2:
        raise InvalidArgumentError(f"merge needs at least two models, got {n}")
    check_models(models)
    weights = [1.0 / n] * n if weights is None else [float(w) for w in weights]
    if len(weights) != n:
        raise InvalidArgumentError(f"weights has {len(weights)} entries for {n} models")
    states = [{k: v.detach() for k, v in m.state_dict().items()} for m in models]
    parent_moments = None  # REPAIR's targets, when the alignment's statistics pass gathered them

    if method == "np_merge":
        return _np_merge(models, states, data=data, spec=spec, example_inputs=example_inputs, reference=reference,
                         alignment=alignment, align_method=align_method, val_data=val_data, np_options=np_options or {},
                         return_alignment=return_alignment, progress=progress, align_options=align_options,
                         repair_mode=repair_mode)
    if method == "average":
        aligned = states
    else:
        if alignment is None and _repair_from_statistics(method, repair_mode, repair_batches, align_options, data):
            alignment, parent_moments = _align_and_measure(models, method, spec=spec, data=data,
                                                           example_inputs=example_inputs, reference=reference,
                                                           progress=progress, align_options=align_options)
        elif alignment is None:
            alignment = _align(models, method, spec=spec, data=data, example_inputs=example_inputs,
                               reference=reference, progress=progress, align_options=align_options)
        spec = alignment.spec
        aligned = [alignment.apply(i, s) for i, s in enumerate(states)]

    merged = copy.deepcopy(models[reference])
    merged_state = combine_states(aligned, weights, reference)
    mode = repair_mode
    if mode == "auto":
        mode = "reset" if (data is not None and has_batch_norm(merged)) else "none"
    if mode in ("reset", "repair") and data is None:
        raise InvalidArgumentError(f"repair_mode={mode!r} needs data")
    if mode == "reset" and not has_batch_norm(merged):
        raise InvalidArgumentError("repair_mode='reset' needs BatchNorm layers; use 'repair' for this model")
    merged.load_state_dict(merged_state)
    merged.eval()
    if mode == "reset":
        reset_batch_norm(merged, data, max_batches=repair_batches)
    elif mode == "repair":
        if spec is None:  # direct average: REPAIR still needs to know each layer's producer
            args, kwargs = ((tuple(example_inputs), {}) if example_inputs is not None
                            else first_batch(data, "trace the model with")[:2])
            spec = cached_trace_spec(models[reference], args, kwargs)
        repair(merged, models, spec, data, transforms=alignment.transforms if alignment is not None else None,
               weights=weights, max_batches=repair_batches, parent_moments=parent_moments)
    return (merged, alignment) if return_alignment else merged
