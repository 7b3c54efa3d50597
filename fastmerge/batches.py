"""Batches as every stage reads them: one way to turn a data-loader batch into a model call.

A batch is a tensor (the inputs), an (inputs, targets, ...) pair, or a dict of keyword inputs.
Statistics, BatchNorm reset, REPAIR, NP Merge and evaluation all iterate through here, so they
accept the same data and stop at the same limits.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch

from .errors import DataError, FastmergeError, InvalidArgumentError


class Batch(NamedTuple):
    """One batch as a model call (`model(*args, **kwargs)`) and its targets (None if unlabelled)."""

    args: tuple
    kwargs: dict
    target: Any


def split_batch(batch) -> tuple[tuple, dict]:
    """(args, kwargs) for a model call from a data-loader batch: a tensor, an (inputs, targets)
    pair (inputs first), or a dict of keyword inputs."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (list, tuple)) and batch:
        return (batch[0],), {}
    raise InvalidArgumentError(f"cannot use a batch of type {type(batch).__name__}; yield tensors, (inputs, targets) or dicts")


def as_batch(batch, *, labelled: bool = False) -> Batch:
    """The batch as a model call and its targets; `labelled` requires (inputs, targets)."""
    has_target = isinstance(batch, (list, tuple)) and len(batch) > 1
    if labelled and not has_target:
        raise DataError("this needs labelled batches (inputs, targets); got a batch without targets")
    args, kwargs = split_batch(batch)
    return Batch(args, kwargs, batch[1] if has_target else None)


def batch_samples(batch: Batch) -> int:
    """Inputs in a batch: the leading size of its first input (1 for a scalar or non-tensor)."""
    first = batch.args[0] if batch.args else next(iter(batch.kwargs.values()))
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1


def iterate_batches(data: Iterable, *, max_batches: int | None = None, labelled: bool = False) -> Iterator[Batch]:
    """The batches of `data` as model calls, at most `max_batches` of them."""
    for b, batch in enumerate(data):
        if max_batches is not None and b >= max_batches:
            break
        yield as_batch(batch, labelled=labelled)


def cycle_batches(data: Iterable, what: str) -> Iterator[Batch]:
    """The batches of `data` over and over (training steps); DataError naming `what` when empty."""
    while True:
        produced = False
        for batch in data:
            produced = True
            yield as_batch(batch)
        if not produced:
            raise DataError(f"{what}: the training data is empty; pass (inputs, targets) batches")


def first_batch(data: Iterable, what: str) -> Batch:
    """The first batch of `data`; DataError saying what needed it when there is none."""
    for batch in data:
        return as_batch(batch)
    raise DataError(f"data is empty: no batch to {what}; pass batches")


def run_model(model, batch: Batch, index: int):
    """`model` on one batch; a batch it cannot run on (a wrong width, dtype or rank, typically after
    a first batch that worked) becomes a DataError naming the batch, the model's message kept."""
    try:
        return model(*batch.args, **batch.kwargs)
    except FastmergeError:
        raise
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), "")
        raise DataError(f"batch {index}: the model cannot run on it ({type(exc).__name__}: {first[:200]}); every "
                        "batch must hold inputs of the shape and dtype the model takes") from exc


def output_logits(output):
    """A model's output tensor: itself, or the logits of a Hugging Face ModelOutput."""
    return output if isinstance(output, torch.Tensor) else getattr(output, "logits", output)


def ensemble_probabilities(models: Sequence, args: tuple, kwargs: dict) -> torch.Tensor:
    """The models' ensemble on one call: the mean of their softmax outputs (float32 logits, last
    axis; ALGORITHMS.md section 9). The caller sets the models' modes and autograd."""
    return sum(torch.softmax(output_logits(m(*args, **kwargs)).float(), -1) for m in models) / len(models)


@contextmanager
def evaluating(models: Sequence):
    """The models in eval mode inside; every module's own mode given back after (inputs are left
    as they came)."""
    modes = [[m.training for m in model.modules()] for model in models]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for model, flags in zip(models, modes):
            for m, flag in zip(model.modules(), flags):
                m.training = flag
