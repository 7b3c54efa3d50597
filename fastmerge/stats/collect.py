"""Activation statistics at the spec's tap points, for every model on the same batches.

    stats = fastmerge.collect_stats(models, loader, spec, max_batches=50)

or, inside a training loop, on the caller's own forward passes::

    with fastmerge.StatsCollector(models, spec) as collector:
        for x, _ in loader:
            for m in models:
                m(x)
    stats = collector.stats

Features are captured in float32 (also under autocast), centred per batch and folded into float64
states with the streaming covariance op; only the block pairs the method needs are kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .. import distributed as _distributed
from ..batches import batch_samples, iterate_batches, run_model
from ..errors import DataError, InvalidArgumentError, NonFiniteError, ShapeMismatchError
from ..ops import CovarianceState
from ..spec.structure import activation_groups, stream_taps
from ..spec.types import Group, MergeSpec, TapPoint
from ..stages import timed
from .attention import multihead_attention_heads


@dataclass
class Stats:
    """Per group, a CovarianceState over one block per model (block i = model i's units)."""

    states: dict[str, CovarianceState]
    num_models: int
    _eigh: dict = field(default_factory=dict, repr=False)

    def covariance_eigh(self, group: str, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """eigh of model i's covariance (float64), computed once: CCA needs it for every
        regularisation value it tries, and (S + g I)^p shares S's eigenvectors."""
        key = (group, i)
        if key not in self._eigh:
            self._eigh[key] = torch.linalg.eigh(self.covariance(group, i, i).double())
        return self._eigh[key]

    def correlation(self, group: str, i: int, j: int) -> torch.Tensor:
        return self.states[group].correlation(i, j)

    def covariance(self, group: str, i: int, j: int) -> torch.Tensor:
        return self.states[group].covariance(i, j)

    def second_moment(self, group: str, i: int, j: int) -> torch.Tensor:
        """E[x_i x_j^T] (not centred): what an orthogonal map x_j -> x_i, which cannot shift means,
        is fitted to (min E||x_i - Q x_j||^2)."""
        state = self.states[group]
        return state.covariance(i, j) + state.mean[i][:, None] * state.mean[j][None, :]

    def all_reduce_(self) -> Stats:
        """Under torch.distributed: combines every rank's statistics exactly (a collective, call it
        on every rank), e.g. after a StatsCollector watched each rank's own training steps."""
        for state in self.states.values():
            state.all_reduce_()
        self._eigh.clear()
        return self


def tap_features(x: torch.Tensor, tap: TapPoint, size: int) -> torch.Tensor:
    """(samples, size) float32 features of a group from the tapped tensor: the unit level of the
    tap axis becomes the columns; batch, positions and replica levels become samples."""
    # samples: the other axes (batch-major), then the grid levels but the unit level, in order
    x = tap.cells(x.detach().float(), tap.dim, grid_last=True).movedim(tap.unit + 1, -1)
    if x.shape[-1] != size:
        raise ShapeMismatchError(f"tap {tap.module}: unit level has {x.shape[-1]} entries, the group has {size}")
    return x.reshape(-1, size)


class StatsCollector:
    """Accumulates group statistics from forward passes of all models on the same inputs.

    Every model must run once per batch (in any order) while the collector is active.

    Args:
        models: the models (architecture of the spec), same inputs each step.
        spec: where to observe each group (its tap point).
        groups: which groups (default: every group with a tap and a single instance).
        pairs: block pairs kept per group ("all_to_one", "full", "diagonal").
        reference: the reference model of "all_to_one".
        max_rows: cap on feature rows per group and batch (random subset of positions, the same
            rows for every model): spatial subsampling for convolutions.
        seed: for that subsampling.
        pool_stream: a residual stream (a group that LayerNorms/RMSNorms read) is also observed at
            every norm's output, all layers pooled (fastmerge.spec.structure.stream_taps).
    """

    def __init__(self, models: Sequence[torch.nn.Module], spec: MergeSpec, *, groups: Sequence[Group] | None = None,
                 pairs: str = "all_to_one", reference: int = 0, max_rows: int | None = None, seed: int = 0,
                 pool_stream: bool = True) -> None:
        if len(models) < 1:
            raise InvalidArgumentError("StatsCollector needs at least one model")
        self.models = list(models)
        self.groups = list(groups) if groups is not None else activation_groups(spec)
        for g in self.groups:
            if g.tap is None or g.count != 1:
                raise InvalidArgumentError(f"group {g.name!r} has no single-instance tap point; statistics cannot observe it")
        # every place each group is observed: its tap, and for a residual stream every norm's output
        extra = stream_taps(spec) if pool_stream else {}
        modules = dict(self.models[0].named_modules())
        self.taps = [(g, i, tap) for g in self.groups
                     for i, tap in enumerate([g.tap] + [t for t in extra.get(g.name, []) if t.module in modules])]
        n = len(self.models)
        # the statistics live where the models run (features never leave that device)
        device = next((t.device for t in self.models[0].state_dict().values()), torch.device("cpu"))
        self.stats = Stats({g.name: CovarianceState([g.size] * n, pairs=pairs if n > 1 else "diagonal",
                                                    reference=reference, device=device) for g in self.groups}, n)
        self.max_rows = max_rows
        self.generator = torch.Generator().manual_seed(seed)
        self._pending = {(g.name, i): [None] * n for g, i, _ in self.taps}
        self._handles: list = []

    def __enter__(self) -> StatsCollector:
        by_module: dict[tuple[str, str], list] = {}
        for g, i, tap in self.taps:
            by_module.setdefault((tap.module, tap.kind), []).append((g, i, tap))
        for index, model in enumerate(self.models):
            modules = dict(model.named_modules())
            for (path, kind), taps in by_module.items():
                if path not in modules:
                    raise InvalidArgumentError(f"tap module {path!r} is not a submodule of model {index}")
                if kind == "input":
                    handle = modules[path].register_forward_pre_hook(self._input_hook(index, taps), with_kwargs=True)
                else:
                    handle = modules[path].register_forward_hook(self._output_hook(index, taps, kind), with_kwargs=True)
                self._handles.append(handle)
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if exc[0] is None:
            waiting = sorted({name for (name, _), p in self._pending.items() if any(x is not None for x in p)})
            if waiting:
                raise InvalidArgumentError(f"some models did not run on the last batch (groups {waiting[:3]} wait for them)")

    def _input_hook(self, model_index: int, taps: list):
        def hook(module, args, kwargs):
            for g, i, tap in taps:
                self._receive_tensor(g, i, tap, model_index, args[tap.arg] if tap.arg < len(args) else None)
            return None

        return hook

    def _output_hook(self, model_index: int, taps: list, kind: str):
        def hook(module, args, kwargs, output):
            if kind == "heads":
                with torch.no_grad():
                    output = multihead_attention_heads(module, args, kwargs)
            for g, i, tap in taps:
                x = output[tap.arg] if isinstance(output, (tuple, list)) else output
                self._receive_tensor(g, i, tap, model_index, x)
            return None

        return hook

    def _receive_tensor(self, group: Group, tap_index: int, tap: TapPoint, model_index: int, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise InvalidArgumentError(f"tap {tap.module}: {tap.kind} {tap.arg} is not a tensor")
        self._receive(group, tap_index, model_index, tap_features(x, tap, group.size))

    def _receive(self, group: Group, tap_index: int, model_index: int, features: torch.Tensor) -> None:
        pending = self._pending[(group.name, tap_index)]
        if pending[model_index] is not None:
            raise InvalidArgumentError(
                f"model {model_index} ran twice before every model saw the batch (group {group.name!r}); "
                "run each model once per batch")
        pending[model_index] = features
        if any(p is None for p in pending):
            return
        rows = pending[0].shape[0]
        if any(p.shape[0] != rows for p in pending):
            raise ShapeMismatchError(f"group {group.name!r}: models produced different numbers of feature rows; "
                                     "feed every model the same batch")
        if self.max_rows is not None and rows > self.max_rows:
            keep = torch.randperm(rows, generator=self.generator)[: self.max_rows].to(pending[0].device)
            pending = [p.index_select(0, keep) for p in pending]
        try:
            self.stats.states[group.name].update(*pending)
        except NonFiniteError as exc:
            raise NonFiniteError(f"group {group.name!r} (tap {group.tap.module}): {exc}") from None
        self._pending[(group.name, tap_index)] = [None] * len(self.models)
@timed("statistics")
def collect_stats(models: Sequence[torch.nn.Module], data: Iterable, spec: MergeSpec, *,
                  groups: Sequence[Group] | None = None, pairs: str = "all_to_one", reference: int = 0,
                  max_batches: int | None = None, max_samples: int | None = None, max_rows: int | None = None,
                  seed: int = 0, progress: bool = True, distributed: bool | None = None,
                  pool_stream: bool = True) -> Stats:
    """One pass over `data` (a DataLoader or any iterable of batches) with every model in eval mode
    and no gradients, accumulating each group's statistics. Stops after `max_batches` batches or
    `max_samples` inputs. Models are returned in the mode they had.

    Under an initialised torch.distributed process group (``distributed`` None: whenever one is
    initialised) each rank passes its own shard of the data and the states are then reduced exactly
    across ranks (CovarianceState.all_reduce_): every rank returns the statistics of all shards."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    seen = 0
    collector = StatsCollector(models, spec, groups=groups, pairs=pairs, reference=reference, max_rows=max_rows,
                               seed=seed, pool_stream=pool_stream)
    total = max_batches if max_batches is not None else (len(data) if hasattr(data, "__len__") else None)
    try:
        with torch.no_grad(), collector, tqdm(total=total, desc="activation statistics", disable=not progress,
                                              leave=False) as bar:
            for index, batch in enumerate(iterate_batches(data, max_batches=max_batches)):
                for m in models:
                    run_model(m, batch, index)
                seen += batch_samples(batch)
                bar.update(1)
                if max_samples is not None and seen >= max_samples:
                    break
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    if distributed is None:
        distributed = _distributed.active()
    if distributed:
        collector.stats.all_reduce_()
        device = next((st.count.device for st in collector.stats.states.values()), torch.device("cpu"))
        total = torch.tensor([float(seen)], dtype=torch.float64, device=device)  # NCCL reduces on the GPU
        torch.distributed.all_reduce(total)
        seen = int(total.item())
    if seen == 0:
        raise DataError("collect_stats got no batches: the data iterable is empty (on every rank); pass batches")
    for name, state in collector.stats.states.items():
        if state.num_samples < 2:
            raise DataError(f"group {name!r} saw {state.num_samples} sample(s): statistics need at least 2 "
                            "(feature rows); pass more data")
    return collector.stats
