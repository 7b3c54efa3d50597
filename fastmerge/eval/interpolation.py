"""The loss along the straight path between two models, its barrier (ALGORITHMS.md section 9), and
the loss over the plane through three models.

Every point of a path or plane is a model whose floating tensors are the combination of the
endpoints'; models with BatchNorm get their running statistics recomputed at every point (without
that the barrier mostly measures stale statistics, not the weights).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..checks import check_models
from ..errors import InvalidArgumentError
from ..merging.repair import has_batch_norm, reset_batch_norm
from .metrics import Metrics, evaluate

_BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class Curve:
    """Loss and accuracy at positions t of theta(t) = (1 - t) theta_A + t theta_B."""

    ts: list[float]
    loss: list[float]
    accuracy: list[float]
    # The parents' own (loss, accuracy) at t = 0 and t = 1, when the path's endpoints are not the
    # parents' functions: a dense alignment (CCA, ZipIt) maps B into A's basis through the
    # nonlinearities, so theta(1) is not B. The barrier is then measured against the parents, not
    # against the (worse) transformed endpoint, which would hide the barrier.
    parents: tuple[tuple[float, float], tuple[float, float]] | None = None

    def _ends(self, which: int) -> tuple[float, float]:
        if self.parents is not None:
            return self.parents[0][which], self.parents[1][which]
        values = self.loss if which == 0 else self.accuracy
        return values[0], values[-1]

    def loss_barrier(self) -> float:
        """max_t [L(t) - ((1 - t) L_A + t L_B)]: 0 for linearly connected models."""
        l0, l1 = self._ends(0)
        return max(loss - ((1 - t) * l0 + t * l1) for t, loss in zip(self.ts, self.loss))

    def accuracy_barrier(self) -> float:
        """max_t [((1 - t) A_A + t A_B) - A(t)] in accuracy points."""
        a0, a1 = self._ends(1)
        return max((1 - t) * a0 + t * a1 - acc for t, acc in zip(self.ts, self.accuracy))

    def as_dict(self) -> dict:
        return {"t": self.ts, "loss": self.loss, "accuracy": self.accuracy, "parents": self.parents,
                "loss_barrier": self.loss_barrier(), "accuracy_barrier": self.accuracy_barrier()}


def _inputs_only(data: Iterable):
    for batch in data:
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


class _PointEvaluator:
    """Loads a state into one working copy of the architecture, resets BatchNorm, evaluates."""

    def __init__(self, template: nn.Module, data: Iterable, reset_data: Iterable | None, max_batches: int | None):
        self.model = copy.deepcopy(template).eval()
        self.data, self.max_batches = data, max_batches
        self.reset_data = reset_data
        self.reset = has_batch_norm(self.model)

    def __call__(self, state: dict) -> Metrics:
        self.model.load_state_dict(state)
        if self.reset:
            reset_batch_norm(self.model, list(_inputs_only(self.reset_data if self.reset_data is not None else self.data)),
                             max_batches=self.max_batches)
        return evaluate(self.model, self.data, max_batches=self.max_batches)


def _floating_names(model: nn.Module) -> list[str]:
    return [k for k, v in model.state_dict().items() if v.is_floating_point() and k.rsplit(".", 1)[-1] not in _BN_STATS]


def _check_pair(a: nn.Module, b: nn.Module) -> None:
    check_models([a, b])


def interpolate(model_a: nn.Module, model_b: nn.Module, data: Iterable, *, ts: Sequence[float] | None = None,
                steps: int = 11, reset_data: Iterable | None = None, max_batches: int | None = None,
                parents: tuple[nn.Module, nn.Module] | None = None) -> Curve:
    """Evaluates theta(t) = (1 - t) theta_A + t theta_B at `ts` (default: `steps` points in [0, 1]).

    Args:
        model_a, model_b: one architecture; align B to A first to measure the aligned path.
        data: labelled batches to evaluate on (the test split, for reporting).
        reset_data: batches for the BatchNorm reset at each t (default: `data`'s inputs); use the
            training split when `data` is the test split.
        parents: the original (A, B) when model_b is B under a dense alignment (not the same
            function): the barrier is then measured against their loss and accuracy.
    """
    _check_pair(model_a, model_b)
    ts = [float(t) for t in (ts if ts is not None else torch.linspace(0, 1, steps).tolist())]
    if len(ts) < 2:
        raise InvalidArgumentError("interpolate needs at least two positions t")
    sa, sb = model_a.state_dict(), model_b.state_dict()
    names = _floating_names(model_a)
    point = _PointEvaluator(model_a, data, reset_data, max_batches)
    losses, accs = [], []
    for t in ts:
        state = dict(sa)
        for k in names:
            state[k] = torch.lerp(sa[k], sb[k], t)
        m = point(state)
        losses.append(m.loss)
        accs.append(m.accuracy)
    ends = None
    if parents is not None:
        ends = tuple((r.loss, r.accuracy) for r in (point(p.state_dict()) for p in parents))
    return Curve(ts, losses, accs, ends)


def barrier(model_a: nn.Module, model_b: nn.Module, data: Iterable, **kwargs) -> float:
    """The loss barrier of the straight path from A to B (see Curve.loss_barrier)."""
    return interpolate(model_a, model_b, data, **kwargs).loss_barrier()


@dataclass
class Plane:
    """Loss/accuracy on a grid over the plane through three models, in orthonormal coordinates
    (distances in weight space): model 0 at (0, 0), model 1 on the first axis."""

    u: list[float]
    v: list[float]
    loss: list[list[float]]      # [i][j] at (u[j], v[i])
    accuracy: list[list[float]]
    points: list[tuple[float, float]] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"u": self.u, "v": self.v, "loss": self.loss, "accuracy": self.accuracy, "points": self.points}


def loss_plane(models: Sequence[nn.Module], data: Iterable, *, grid: int = 11, margin: float = 0.2,
               reset_data: Iterable | None = None, max_batches: int | None = None) -> Plane:
    """Evaluates the plane through three models on a `grid` x `grid` lattice that covers them with
    `margin` (a fraction of the span) on every side."""
    if len(models) != 3:
        raise InvalidArgumentError(f"loss_plane needs exactly three models, got {len(models)}")
    check_models(models)
    names = _floating_names(models[0])
    states = [m.state_dict() for m in models]
    flat = [torch.cat([s[k].double().reshape(-1) for k in names]) for s in states]
    d1, d2 = flat[1] - flat[0], flat[2] - flat[0]
    n1 = float(d1.norm())
    if n1 == 0:
        raise InvalidArgumentError("loss_plane: models 0 and 1 are identical; the plane is not defined")
    e1 = d1 / n1
    x2 = float(d2 @ e1)
    rest = d2 - x2 * e1
    n2 = float(rest.norm())
    if n2 <= 1e-12 * n1:
        raise InvalidArgumentError("loss_plane: the three models lie on one line; the plane is not defined")
    e2 = rest / n2
    points = [(0.0, 0.0), (n1, 0.0), (x2, n2)]
    lo_u, hi_u = min(0.0, x2), max(n1, x2)
    span_u, span_v = hi_u - lo_u, n2
    us = torch.linspace(lo_u - margin * span_u, hi_u + margin * span_u, grid).tolist()
    vs = torch.linspace(-margin * span_v, n2 + margin * span_v, grid).tolist()
    point = _PointEvaluator(models[0], data, reset_data, max_batches)
    sizes = [states[0][k].numel() for k in names]
    loss, acc = [], []
    for v in vs:
        row_l, row_a = [], []
        for u in us:
            vec = flat[0] + u * e1 + v * e2
            state = dict(states[0])
            for k, piece in zip(names, torch.split(vec, sizes)):
                state[k] = piece.view_as(states[0][k]).to(states[0][k].dtype)
            m = point(state)
            row_l.append(m.loss)
            row_a.append(m.accuracy)
        loss.append(row_l)
        acc.append(row_a)
    return Plane(us, vs, loss, acc, points)
