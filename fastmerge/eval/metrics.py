"""Loss and accuracy of a model, or of an ensemble, on labelled batches."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..batches import ensemble_probabilities, evaluating, iterate_batches, output_logits
from ..errors import DataError


@dataclass(frozen=True)
class Metrics:
    loss: float       # mean per-sample loss
    accuracy: float   # percent
    samples: int

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def _score(predict: Callable, data: Iterable, max_batches: int | None) -> Metrics:
    """predict(args, kwargs) -> log-probabilities; summed on the device, read back once."""
    loss_sum, correct, total = None, None, 0
    for args, kwargs, target in iterate_batches(data, max_batches=max_batches, labelled=True):
        logp = predict(args, kwargs)
        if logp.dim() > 2 and logp.shape[:-1] == target.shape:  # a sequence model: every position is a sample
            logp, target = logp.reshape(-1, logp.shape[-1]), target.reshape(-1)
        batch_loss = nn.functional.nll_loss(logp, target, reduction="sum")
        batch_correct = (logp.argmax(-1) == target).sum()
        loss_sum = batch_loss if loss_sum is None else loss_sum + batch_loss
        correct = batch_correct if correct is None else correct + batch_correct
        total += int(target.numel())
    if total == 0:
        raise DataError("evaluation got no batches; pass labelled data")
    return Metrics(float(loss_sum) / total, 100.0 * float(correct) / total, total)


def evaluate(model: nn.Module, data: Iterable, *, max_batches: int | None = None) -> Metrics:
    """Cross-entropy and accuracy of a classifier (logits over the last axis) in eval mode; the
    model is handed back in the mode it had. A sequence model's (batch, positions, classes) logits
    with (batch, positions) targets count every position (a language model: loss per token,
    perplexity exp(loss))."""
    with evaluating([model]):
        return _score(lambda a, k: torch.log_softmax(output_logits(model(*a, **k)).float(), -1), data, max_batches)


def ensemble(models: Sequence[nn.Module], data: Iterable, *, max_batches: int | None = None) -> Metrics:
    """The ensemble that averages the models' softmax outputs (the usual upper reference of a merge)."""
    with evaluating(models):
        return _score(lambda a, k: ensemble_probabilities(models, a, k).clamp_min(1e-30).log(), data, max_batches)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Percent of the rows of `x` whose argmax prediction is their label in `y` (one batch)."""
    return float((model(x).argmax(1) == y).double().mean() * 100)


@torch.no_grad()
def ensemble_accuracy(models: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor) -> float:
    """accuracy() of the ensemble that sums the models' softmax outputs."""
    probs = sum(torch.softmax(m(x), dim=1) for m in models)
    return float((probs.argmax(1) == y).double().mean() * 100)
