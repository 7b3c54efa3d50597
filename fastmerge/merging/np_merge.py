"""NP Merge: a learned merging coefficient for every parameter (ALGORITHMS.md section 6).

For two aligned parents, W = alpha * W_A + (1 - alpha) * W_B with alpha = sigmoid(a), a = 0 at the
start (uniform averaging), trained by gradient descent on a task loss with the parents frozen. For
n parents either the joint form (alpha = softmax over the models per entry) or successive pairwise
merges (the paper's way). The merged weights are computed inside every forward pass from the frozen
parents and the coefficients through the fused multi-tensor combination op (its backward gives the
coefficient gradients); only the logits are trainable.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..batches import (batch_samples, cycle_batches, ensemble_probabilities, evaluating, iterate_batches,
                       output_logits)
from ..checks import check_models
from ..errors import InvalidArgumentError
from ..ops import combine, sigmoid_merge
from ..stages import timed
from ..threads import is_small_step, single_thread_if
from .repair import has_batch_norm, reset_batch_norm

GRANULARITIES = ("entry", "channel", "tensor")
MODES = ("joint", "pairwise")
# the ensemble's probabilities for a list of batches are kept (computed on a batch's first visit)
# while they fit in this many bytes; beyond it they are recomputed at every visit
TEACHER_CACHE_BYTES = 256 * 2**20


@dataclass
class NPMergeResult:
    """The merged model and, per parameter, the learned coefficients (n, *coefficient shape): how
    much of each parent the merge keeps (they sum to 1 over the models)."""

    model: nn.Module
    coefficients: dict[str, torch.Tensor]
    history: list = field(default_factory=list)  # (step, train loss, validation accuracy or None)
    best_step: int = 0
    val_accuracy: float | None = None  # at best_step (BatchNorm statistics fresh for every check)

    def summary(self) -> str:
        """Per-layer mean coefficient of each parent (where each parent dominates)."""
        lines = ["| parameter | " + " | ".join(f"parent {i}" for i in range(self._n())) + " |",
                 "|---|" + "---|" * self._n()]
        for name, c in self.coefficients.items():
            means = c.reshape(c.shape[0], -1).mean(1)
            lines.append(f"| {name} | " + " | ".join(f"{float(v):.3f}" for v in means) + " |")
        return "\n".join(lines)

    def _n(self) -> int:
        return next(iter(self.coefficients.values())).shape[0] if self.coefficients else 0


def _coefficient_shape(shape: torch.Size, granularity: str) -> tuple:
    if granularity == "entry" or len(shape) == 0:
        return tuple(shape)
    if granularity == "channel":
        return (shape[0],) + (1,) * (len(shape) - 1)
    return (1,) * len(shape)


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The default loss: cross-entropy over the last axis; a sequence model's (batch, positions,
    classes) outputs with (batch, positions) targets count every position (a language model); a
    Hugging Face model's output counts by its logits."""
    output = output_logits(output)
    if output.dim() > 2 and output.shape[:-1] == target.shape:
        return nn.functional.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))
    return nn.functional.cross_entropy(output, target)


@torch.no_grad()
def _accuracy(forward, data: Iterable) -> float:
    correct = total = 0
    for args, kwargs, target in iterate_batches(data, labelled=True):
        pred = output_logits(forward(args, kwargs)).argmax(-1)
        correct = correct + (pred == target).sum()  # summed where the model runs, read once
        total += int(target.numel())
    if distributed.active():  # every rank scores its shard; all of them see the accuracy on the union
        device = correct.device if isinstance(correct, torch.Tensor) else torch.device("cpu")  # NCCL: the GPU
        counts = torch.tensor([float(correct), float(total)], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(counts)
        return float(counts[0]) / max(float(counts[1]), 1.0)
    return int(correct) / max(total, 1)


def _average_gradients(params) -> None:
    """Data-parallel NP Merge: each rank's gradient of its shard's mean loss, averaged over ranks
    (the coefficients are the only trainable tensors, so this is all DDP would do)."""
    grads = [p.grad for p in params if p.grad is not None]
    distributed.all_reduce_sum_(grads)
    for g in grads:
        g /= distributed.world_size()


def _distillation_loss(output: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """KL(ensemble || merged) per sample (per position for sequence outputs), averaged: the
    cross-entropy against the ensemble's probabilities less their own entropy (a constant), so a
    merge that computes the ensemble's distribution scores 0."""
    log_probs = torch.log_softmax(output_logits(output).float(), -1)
    return (probs * (probs.clamp_min(1e-30).log() - log_probs)).sum(-1).mean()


class EnsembleTargets:
    """The teachers' ensemble on a batch: the mean of their softmax outputs (eval mode, no grad;
    ALGORITHMS.md section 9's ensemble). For batches given as a list, each batch's probabilities
    are kept after its first visit while they fit in TEACHER_CACHE_BYTES: NP Merge cycles over the
    same batches, and the teachers' forward passes would otherwise cost each step n more passes."""

    def __init__(self, teachers: Sequence[nn.Module], data: Iterable) -> None:
        self.teachers = list(teachers)
        self.positions = len(data) if isinstance(data, (list, tuple)) else None
        self.cache: dict[int, torch.Tensor] = {}
        self.cached_bytes = 0

    @torch.no_grad()
    def __call__(self, step: int, args: tuple, kwargs: dict) -> torch.Tensor:
        position = step % self.positions if self.positions else None
        if position in self.cache:
            return self.cache[position]
        probs = ensemble_probabilities(self.teachers, args, kwargs)
        size = probs.numel() * probs.element_size()
        if position is not None and self.cached_bytes + size <= TEACHER_CACHE_BYTES:
            self.cache[position] = probs
            self.cached_bytes += size
        return probs


def _set_bn_batch_stats(model: nn.Module) -> None:
    """Eval mode everywhere but BatchNorm, which normalises with the batch's statistics: the merged
    weights change every step, so running statistics of the parents would be stale."""
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
@timed("NP Merge")
def np_merge(models: Sequence[nn.Module], data: Iterable, *, steps: int = 300, lr: float = 1e-2,
             optimizer: str | Callable = "adam", val_data: Iterable | None = None, eval_every: int = 25,
             patience: int | None = None, loss_fn: Callable | None = None, granularity: str = "entry",
             mode: str = "joint", seed: int = 0, progress: bool = True, reset_bn: bool = True,
             reset_batches: int | None = None, distill: float = 0.0,
             teachers: Sequence[nn.Module] | None = None) -> NPMergeResult:
    """Learns per-parameter merging coefficients for already aligned models.

    Data-parallel: under an initialised torch.distributed process group (e.g. torchrun), give each
    rank its shard of every batch (and of the validation data): the coefficients' gradients are
    averaged over ranks, validation accuracy is counted over all shards, so every rank takes the
    same steps, as one process would on the whole batches (equal shard sizes), and ends with the
    same merged model.

    Args:
        models: two or more aligned models of one architecture (fastmerge.align / merge(..., "np_merge")).
        data: training batches (inputs, targets), cycled for `steps` steps; a small training subset.
        steps, lr, optimizer: "adam" (default), "sgd", or a callable params -> torch.optim.Optimizer.
        val_data: held-out batches; the coefficients with the best validation accuracy (checked every
            `eval_every` steps) are returned, and training stops after `patience` checks without
            improvement. Without it, the last step's coefficients are returned.
        loss_fn: loss(output, target), cross-entropy by default (per position for sequence outputs).
        granularity: one coefficient per "entry" (default), per output "channel", or per "tensor".
        mode: for more than two models, "joint" (softmax over models per entry) or "pairwise"
            (successive two-model merges, the running merge weighted k/(k+1) at the start).
        seed: offsets the seeds of the successive pairwise merges (the optimisation itself is
            deterministic: coefficients start at uniform, batches come in order).
        reset_bn: recompute BatchNorm statistics of the merged model on `data` at the end, and before
            every validation check (the merged weights change every step: the parents' running
            statistics would score a model that is not the one returned).
        reset_batches: the batches of `data` those resets pass (default: all of them).
        distill: the share of the loss that matches the teachers' ensemble (the mean of their
            softmax outputs; the loss KL(ensemble || merged)) instead of `loss_fn` on the batches'
            targets: 0 (default) the task loss alone, 1 the ensemble alone (the batches then need
            no targets), in between the weighted sum. The ensemble gives every sample a whole
            distribution to match rather than one label, which learns more from a small set
            (benchmarks/RESULTS.md, BatchNorm CNNs).
        teachers: the models whose ensemble is distilled (default: `models`). merge(...,
            "np_merge") passes the models as they were before alignment: a dense alignment (CCA,
            ZipIt) changes each aligned parent's function, a permutation does not. Used in eval
            mode; each module's mode is given back after.

    Returns:
        NPMergeResult (merged model in eval mode, coefficients, history).
    """
    if len(models) < 2:
        raise InvalidArgumentError(f"np_merge needs at least two models, got {len(models)}")
    check_models(models)
    if granularity not in GRANULARITIES:
        raise InvalidArgumentError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if mode not in MODES:
        raise InvalidArgumentError(f"mode must be one of {MODES}, got {mode!r}")
    if steps < 0:
        raise InvalidArgumentError(f"steps must be >= 0, got {steps}")
    if not 0.0 <= distill <= 1.0:
        raise InvalidArgumentError(f"distill is the ensemble's share of the loss, between 0 and 1; got {distill!r}")
    teachers = list(models) if teachers is None else list(teachers)
    if distill > 0 and not teachers:
        raise InvalidArgumentError("np_merge: distill > 0 needs teachers (the models whose ensemble is matched)")
    if distill > 0 and mode == "pairwise" and len(models) > 2 and len(teachers) != len(models):
        raise InvalidArgumentError(f"np_merge: pairwise distillation needs a teacher per model ({len(models)}), got "
                                   f"{len(teachers)}: merge k learns the ensemble of the first k + 1")
    with evaluating(teachers if distill > 0 else []):
        return _np_merge(models, data, steps=steps, lr=lr, optimizer=optimizer, val_data=val_data,
                         eval_every=eval_every, patience=patience, loss_fn=loss_fn, granularity=granularity,
                         mode=mode, seed=seed, progress=progress, reset_bn=reset_bn, reset_batches=reset_batches,
                         distill=distill, teachers=teachers)


def _np_merge(models, data, *, steps, lr, optimizer, val_data, eval_every, patience, loss_fn, granularity, mode,
              seed, progress, reset_bn, reset_batches, distill, teachers) -> NPMergeResult:
    if mode == "pairwise" and len(models) > 2:
        merged = models[0]
        coefficients: dict[str, list] = {}
        history = []
        for k, model in enumerate(models[1:], start=1):
            prior = math.log(k)  # sigmoid(log k) = k/(k+1): the running merge stands for k models
            # the running merge stands for the first k models: it and model k learn the ensemble of k + 1
            targets = EnsembleTargets(teachers[:k + 1], data) if distill > 0 else None
            result = _optimise([merged, model], data, steps=steps, lr=lr, optimizer=optimizer, val_data=val_data,
                               eval_every=eval_every, patience=patience, loss_fn=loss_fn, granularity=granularity,
                               seed=seed + k, progress=progress, reset_bn=reset_bn, prior=prior,
                               reset_batches=reset_batches, distill=distill, targets=targets)
            merged = result.model
            history += result.history
            for name, c in result.coefficients.items():
                previous = coefficients.get(name)
                if previous is None:
                    coefficients[name] = [c[0], c[1]]
                else:  # the running merge's share splits among the models it holds
                    coefficients[name] = [p * c[0] for p in previous] + [c[1]]
        return NPMergeResult(merged, {k: torch.stack(v) for k, v in coefficients.items()}, history, steps)
    return _optimise(models, data, steps=steps, lr=lr, optimizer=optimizer, val_data=val_data, eval_every=eval_every,
                     patience=patience, loss_fn=loss_fn, granularity=granularity, seed=seed, progress=progress,
                     reset_bn=reset_bn, prior=0.0, reset_batches=reset_batches, distill=distill,
                     targets=EnsembleTargets(teachers, data) if distill > 0 else None)


class CoefficientMerger:
    """The trainable part of NP Merge: logits per parameter and the merged parameters they give.

    Two parents: alpha = sigmoid(a) and 1 - alpha (a single logit tensor, started at `prior`);
    more: a softmax over one logit tensor per parent. merged_params() runs the fused multi-tensor
    combination (for two parents the fused sigmoid merge), so one call makes every merged tensor
    and its backward gives every logit's gradient in one pass."""

    def __init__(self, parents: Sequence[dict], names: Sequence[str], granularity: str = "entry",
                 prior: float = 0.0) -> None:
        self.parents, self.names, self.n = parents, list(names), len(parents)
        lead = (self.n if self.n > 2 else 1,)
        self.logits = {k: torch.full(lead + _coefficient_shape(parents[0][k].shape, granularity),
                                     prior if self.n == 2 else 0.0, dtype=torch.float32,
                                     device=parents[0][k].device, requires_grad=True)
                       for k in self.names}

    def coefficients(self) -> list[list[torch.Tensor]]:
        per_model: list[list[torch.Tensor]] = [[] for _ in range(self.n)]
        for k in self.names:
            a = self.logits[k]
            probs = torch.cat([torch.sigmoid(a), 1 - torch.sigmoid(a)]) if self.n == 2 else torch.softmax(a, dim=0)
            for i in range(self.n):
                per_model[i].append(probs[i])
        return per_model

    def merged_params(self) -> dict[str, torch.Tensor]:
        if self.n == 2:  # the fused sigmoid merge: no weight-sized intermediates forward or backward
            out = sigmoid_merge([self.parents[0][k] for k in self.names], [self.parents[1][k] for k in self.names],
                                [self.logits[k][0] for k in self.names])
        else:
            out = combine([[p[k] for k in self.names] for p in self.parents], coefficients=self.coefficients())
        return dict(zip(self.names, out))


def _optimise(models, data, *, steps, lr, optimizer, val_data, eval_every, patience, loss_fn, granularity, seed,
              progress, reset_bn, prior, reset_batches, distill, targets) -> NPMergeResult:
    n = len(models)
    template = copy.deepcopy(models[0])
    parents = [{k: v.detach() for k, v in m.named_parameters()} for m in models]
    names = [k for k, v in parents[0].items() if v.is_floating_point()]
    buffers = {k: sum(dict(m.named_buffers())[k].to(torch.float64) for m in models).div(n).to(b.dtype)
               if b.is_floating_point() else b.clone()
               for k, b in template.named_buffers()}
    merger = CoefficientMerger(parents, names, granularity, prior)
    logits, coefficients, merged_params = merger.logits, merger.coefficients, merger.merged_params

    def forward(args, kwargs):
        return torch.func.functional_call(template, ({**merged_params(), **buffers}), args, kwargs)

    fresh_statistics = reset_bn and has_batch_norm(template)

    def validate() -> float:
        """Validation accuracy of the current merge, with BatchNorm statistics of its own when
        they are reset at the end (what the returned model will have)."""
        if not fresh_statistics:
            template.eval()
            score = _accuracy(forward, val_data)
        else:
            with torch.no_grad():
                checked = copy.deepcopy(template)
                checked.load_state_dict({**{k: v.detach() for k, v in merged_params().items()}, **buffers},
                                        strict=False)
            reset_batch_norm(checked, data, max_batches=reset_batches)
            score = _accuracy(lambda args, kwargs: checked(*args, **kwargs), val_data)
        _set_bn_batch_stats(template)
        return score

    if optimizer == "adam":
        opt = torch.optim.Adam(list(logits.values()), lr=lr)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(list(logits.values()), lr=lr, momentum=0.9)
    elif callable(optimizer):
        opt = optimizer(list(logits.values()))
    else:
        raise InvalidArgumentError(f"optimizer must be 'adam', 'sgd' or a callable, got {optimizer!r}")
    loss_fn = loss_fn or cross_entropy
    history = []
    best = (-1.0, 0, {k: v.detach().clone() for k, v in logits.items()})
    checks_without_gain = 0
    _set_bn_batch_stats(template)
    batches = cycle_batches(data, "np_merge")
    first = next(batches) if steps else None  # tiny steps (a small dense model) run on one thread
    batches = itertools.chain([first], batches) if first is not None else batches
    bar = tqdm(range(steps), desc="NP Merge", disable=not progress, leave=False)
    with single_thread_if(first is not None and is_small_step(template, batch_samples(first))):
        if val_data is not None:
            best = (validate(), 0, best[2])
        for step in bar:
            args, kwargs, target = next(batches)
            if target is None and distill < 1:
                raise InvalidArgumentError("np_merge: training batches must be (inputs, targets), or distill=1 "
                                           "(the parents' ensemble as the only target)")
            output = forward(args, kwargs)
            loss = loss_fn(output, target) if distill < 1 else 0.0
            if distill > 0:
                loss = (1 - distill) * loss + distill * _distillation_loss(output, targets(step, args, kwargs))
            opt.zero_grad()
            loss.backward()
            if distributed.active():
                _average_gradients(list(logits.values()))
            opt.step()
            loss = loss.detach()  # read back only at checks: no host round trip per step on a GPU
            val = None
            if val_data is not None and ((step + 1) % eval_every == 0 or step + 1 == steps):
                val = validate()
                if val > best[0]:
                    best = (val, step + 1, {k: v.detach().clone() for k, v in logits.items()})
                    checks_without_gain = 0
                else:
                    checks_without_gain += 1
                bar.set_postfix(loss=f"{loss.item():.4f}", val_acc=f"{100 * val:.1f}")
            elif progress and (step + 1) % eval_every == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
            history.append((step + 1, loss, val))
            if patience is not None and checks_without_gain >= patience:
                break
    bar.close()
    losses = torch.stack([h[1] for h in history]).tolist() if history else []
    history = [(step, loss, val) for (step, _, val), loss in zip(history, losses)]
    if val_data is None:
        best = (0.0, len(history), {k: v.detach().clone() for k, v in logits.items()})
    with torch.no_grad():
        for k, v in best[2].items():
            logits[k].copy_(v)
        final = merged_params()
        probs = coefficients()
    merged = copy.deepcopy(models[0])
    merged.load_state_dict({**{k: v.detach() for k, v in final.items()}, **buffers}, strict=False)
    merged.eval()
    if reset_bn and has_batch_norm(merged):
        # under a process group: combined across the ranks' shards
        reset_batch_norm(merged, data, max_batches=reset_batches)
    coefs = {k: torch.stack([probs[i][j].detach() for i in range(n)]) for j, k in enumerate(names)}
    return NPMergeResult(merged, coefs, history, best[1], best[0] if val_data is not None else None)
