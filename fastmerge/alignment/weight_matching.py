"""Weight matching (Git Re-Basin): data-free permutations by coordinate descent over groups.

For group G with every other group's current permutation applied to model i, the cost of
matching unit u of the target to unit u' of model i is sum over G's members of
<target rows at u, model rows at u'> (ALGORITHMS.md section 3); a linear assignment picks G's
permutation. Groups are visited in a seeded random order until a sweep changes nothing.

Groups with nested instanced groups (attention heads whose dims are permuted per head) are
matched on the best inner alignment: cost(u, u') adds, for each nested group D, the value of
the assignment between the units of D inside block u and inside block u' (a batch of small
LAPs, one per pair). This is what lets heads be found when their dims are permuted too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import _ext
from ..ops import linear_assignment
from ..spec.structure import nested_groups, unfold
from ..spec.transforms import apply_transforms
from ..spec.types import Group, MergeSpec
from ..stages import timed


def identity_perms(spec: MergeSpec, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    return {g.name: torch.arange(g.size, device=device).repeat(g.count, 1) for g in spec.groups}


def _device_of(state: Mapping[str, torch.Tensor]) -> torch.device:
    """Where the weights live: permutations and costs are made there (CPU for an empty state)."""
    return next((v.device for v in state.values()), torch.device("cpu"))


def _member_tensors(groups: Sequence[Group]) -> set[str]:
    return {m.tensor for g in groups for m in g.members}


def _compute_dtype(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _group_cost(spec: MergeSpec, group: Group, nested: list, target: Mapping[str, torch.Tensor],
                state: Mapping[str, torch.Tensor], perms: dict[str, torch.Tensor], workspace: "Workspace | None" = None):
    """(count, size, size) similarity of target units (rows) to model units (columns), and for
    each nested group its (size, size, d, d) inner similarity blocks. With a `workspace`, they
    live in its memory: valid until the next group's cost."""
    skip = {group.name} | {d.name for d, _ in nested}
    others = {k: v for k, v in perms.items() if k not in skip}
    device = _device_of(state)
    cost = Float64Sum((group.count, group.size, group.size), device, workspace, "cost")
    inner = {d.name: Float64Sum((group.size, group.size, d.size, d.size), device, workspace, d.name)
             for d, _ in nested}
    for chunk in _tensor_chunks(group, state):
        # the member tensors with the other groups' permutations applied, a bounded chunk at a time
        # (one batched op per chunk; a residual stream touches almost every tensor of a model)
        moved = apply_transforms(spec, {n: state[n] for n in chunk}, others)
        for m in group.members:
            if m.tensor in moved:
                _add_member_cost(m, target[m.tensor], moved[m.tensor], nested, cost, inner)
    return cost.total(), {name: blocks.total() for name, blocks in inner.items()}


class Workspace:
    """Memory reused from one group's cost to the next during a descent: fresh memory costs a page
    fault per 4 KiB, and for a 4096-unit group's 134 MB float64 cost and 67 MB float32 products
    that is more than the arithmetic (measured on 2 cores: three products added into a fresh
    buffer 61 ms, into a reused one 11 ms). A buffer stays valid until its key is asked for
    again; the buffers of the last few shapes are kept."""

    MAX_SHAPES = 3

    def __init__(self):
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._recent: dict[tuple, None] = {}  # shapes, least recently used first

    def get(self, key: tuple, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        shape = tuple(shape)
        self._recent.pop(shape, None)
        self._recent[shape] = None
        if len(self._recent) > self.MAX_SHAPES:  # the least recently used shape gives its memory back
            gone = next(iter(self._recent))
            del self._recent[gone]
            self._buffers = {k: v for k, v in self._buffers.items() if k[1] != gone}
        full = (key, shape, dtype, str(device))
        if full not in self._buffers:
            self._buffers[full] = torch.empty(shape, dtype=dtype, device=device)
        return self._buffers[full]


class Float64Sum:
    """A float64 total of float32 (or float64) parts added in order: the same bits as
    `total += part.double()` part after part, but the parts wait (a few, bounded in bytes) and are
    added in one pass of the engine's accumulate op (two passes over a 134 MB float64 total per
    member cost more than the member's product on 2 cores). With a workspace, the total and the
    parts (`part_buffer`) live in reused memory."""

    MAX_PARTS = 8
    MAX_BYTES = 256 << 20

    def __init__(self, shape: tuple[int, ...], device: torch.device, workspace: Workspace | None = None,
                 name: str = "total"):
        self.shape = tuple(shape)
        self._device = torch.device(device)
        self._workspace, self._name = workspace, name
        self._fused = self._device.type == "cpu" and _ext.load()
        if workspace is not None:
            self._sum = workspace.get((name, "sum"), self.shape, torch.float64, self._device)
            if not self._fused:
                self._sum.zero_()
        else:
            self._sum = (torch.empty if self._fused else torch.zeros)(self.shape, dtype=torch.float64, device=self._device)
        self._fresh = True
        self._parts: list[torch.Tensor] = []
        self._bytes = 0

    def part_buffer(self, dtype: torch.dtype) -> torch.Tensor | None:
        """Memory for the next part (of the total's shape), or None (let the product allocate)."""
        if self._workspace is None:
            return None
        if self._parts and dtype != self._parts[0].dtype:
            self._flush()
        return self._workspace.get((self._name, "part", len(self._parts)), self.shape, dtype, self._device)

    def add(self, part: torch.Tensor) -> None:
        if not self._fused:
            self._sum += part.double()
            return
        if self._parts and part.dtype != self._parts[0].dtype:
            self._flush()
        self._parts.append(part)
        self._bytes += part.nbytes
        if len(self._parts) >= self.MAX_PARTS or self._bytes >= self.MAX_BYTES:
            self._flush()

    def total(self) -> torch.Tensor:
        self._flush()
        if self._fresh and self._fused:  # nothing was added
            self._sum.zero_()
            self._fresh = False
        return self._sum

    def _flush(self) -> None:
        if self._parts:
            torch.ops.fastmerge.accumulate_float64_(self._sum, self._parts, self._fresh)
            self._fresh = False
        self._parts, self._bytes = [], 0


_CHUNK_BYTES = 256 << 20


def _tensor_chunks(group: Group, state: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """The group's member tensors in chunks of at most _CHUNK_BYTES (at least one tensor each)."""
    sizes = state.tensor_bytes if hasattr(state, "tensor_bytes") else (lambda n: state[n].nbytes)
    chunks, current, used = [], [], 0
    for name in sorted(_member_tensors([group])):
        nbytes = sizes(name)
        if current and used + nbytes > _CHUNK_BYTES:
            chunks.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    return chunks + ([current] if current else [])


def _add_member_cost(m, target_tensor: torch.Tensor, moved_tensor: torch.Tensor, nested: list, cost: "Float64Sum",
                     inner: dict) -> None:
    key = (m.tensor, m.axis, m.offset)
    # products in float32 (float64 weights stay float64), each member's C x C result summed in
    # float64: twice the speed of float64 products on large models, same assignments
    t, s = _compute_dtype(target_tensor), _compute_dtype(moved_tensor)
    if t.dtype != s.dtype:  # a float64 target (MergeMany's mean) against float32 weights
        t, s = t.double(), s.double()
    nests = [(d, dms[key]) for d, dms in nested if key in dms]
    if not nests:
        a, b = unfold(t, m), unfold(s, m)
        out = cost.part_buffer(a.dtype)
        cost.add(torch.matmul(a, b.transpose(1, 2), out=out) if out is not None else a @ b.transpose(1, 2))
    for d, dm in nests:
        # the part of the member that D covers (e.g. the q/k thirds of a fused projection)
        part = replace(m, select=tuple(sorted(set(m.select) | set(dm.select))))
        a, b = unfold(t, part, keep=dm.unit)[0], unfold(s, part, keep=dm.unit)[0]  # (size, d, rest)
        inner[d.name].add(torch.einsum("uer,vfr->uvef", a, b))


def _solve_nested(group: Group, cost: torch.Tensor, inner: dict) -> tuple[torch.Tensor, dict]:
    """Adds the best inner alignment value of every (u, u') pair, solves the group's LAP, and
    returns the nested groups' per-instance permutations implied by the chosen pairs."""
    size = group.size
    solutions = {}
    total = cost[0].clone()
    for name, blocks in inner.items():
        d = blocks.shape[-1]
        flat = blocks.reshape(size * size, d, d)
        _, cols = linear_assignment(flat, maximize=True)
        values = flat.gather(2, cols[:, :, None]).squeeze(-1).sum(-1).reshape(size, size)
        total += values
        solutions[name] = cols.reshape(size, size, d)
    _, perm = linear_assignment(total, maximize=True)
    nested_perms = {name: cols[torch.arange(size, device=perm.device), perm] for name, cols in solutions.items()}
    return perm[None, :], nested_perms


@torch.no_grad()  # weights that require grad (a model's parameters) are only read
def signature_perms(spec: MergeSpec, target: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
                    frozen: Sequence[str] = (), points: int = 16) -> dict[str, torch.Tensor]:
    """A starting point for coordinate descent that does not depend on the other groups: each
    unit is described by the sorted magnitudes of everything it touches (quantiles per member,
    scaled per member), which no permutation of another group changes, and units are matched by
    the distance of their descriptions. Exact for a permuted copy; for independently trained
    models, better informed than the identity (which means nothing between two initialisations)."""
    perms = identity_perms(spec, _device_of(state))
    scratch: dict = {}  # one buffer for the strided members' contiguous copies (fresh memory faults)
    for g in spec.groups:
        if g.name in frozen or g.count != 1:
            continue
        sig_t, sig_s = [], []
        for m in g.members:
            for src, out in ((target, sig_t), (state, sig_s)):
                out.append(_quantiles(unfold(_compute_dtype(src[m.tensor]), m)[0], points, scratch))
        a, b = torch.cat(sig_t, dim=1), torch.cat(sig_s, dim=1)
        _, cols = linear_assignment(torch.cdist(a, b), maximize=False)
        perms[g.name] = cols[None]
    return perms


def _quantiles(rows: torch.Tensor, points: int, scratch: dict | None = None) -> torch.Tensor:
    """(size, points) float64 quantiles of each row's magnitudes (signature_perms), scaled by the
    rows' overall rms. The order statistics come from a radix sort of each row's magnitude bits
    (compiled, float32 CPU rows: ~5x faster than torch's sort, which took most of a GPT-2-medium
    match from files; the sums of squares for the rms from the same pass) or from torch's sort in
    the weights' own dtype: either way the same order statistics (the rms may differ in its last
    bits between the two). `scratch`: a dict that keeps a buffer for strided rows' contiguous copy
    from call to call."""
    rows = _contiguous(rows, scratch)
    pick = torch.linspace(0, rows.shape[1] - 1, min(points, rows.shape[1]), device=rows.device).round().long()
    if rows.dtype == torch.float32 and rows.device.type == "cpu" and rows.numel() and _ext.load():
        ascending = (rows.shape[1] - 1 - pick).tolist()  # the descending picks as ascending ranks
        values, squares = torch.ops.fastmerge.magnitude_signature(rows, ascending)
        return values.double() / (squares.sum() / rows.numel()).sqrt().clamp_min(1e-300)
    return _quantile_values_sorted(rows, pick).double() / _rms(rows)


def _contiguous(rows: torch.Tensor, scratch: dict | None) -> torch.Tensor:
    """`rows` contiguous; a copy goes into scratch's reused buffer (grown as needed) when given."""
    if rows.is_contiguous() or scratch is None:
        return rows.contiguous()
    key = (rows.dtype, rows.device)
    buffer = scratch.get(key)
    if buffer is None or buffer.numel() < rows.numel():
        buffer = scratch[key] = torch.empty(rows.numel(), dtype=rows.dtype, device=rows.device)
    return buffer[: rows.numel()].view(rows.shape).copy_(rows)


def _rms(rows: torch.Tensor) -> torch.Tensor:
    """The rms of every entry, each squared in float64 as it is read (no float32 squares in memory:
    one pass instead of three), at least 1e-300."""
    return (torch.linalg.vector_norm(rows, dtype=torch.float64) / max(rows.numel(), 1) ** 0.5).clamp_min(1e-300)


def _quantile_values_sorted(rows: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
    """The magnitudes at descending positions `pick` of each row, by torch's sort in the weights'
    dtype (a strided float64 view sorted 3x slower)."""
    return rows.abs().sort(dim=1, descending=True).values[:, pick]


@torch.no_grad()
def objective(spec: MergeSpec, target: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
              perms: Mapping[str, torch.Tensor]) -> float:
    """sum over every tensor of the spec of <target, permuted model>: what weight matching maximises.

    One tensor at a time (a permuted copy of the whole model would double the memory of a large
    merge), in a fixed order so the float64 sum, and the convergence test on it, repeat exactly."""
    total = 0.0
    for n in sorted(_member_tensors(spec.groups)):
        t, m = _compute_dtype(target[n]), _compute_dtype(apply_transforms(spec, {n: state[n]}, perms)[n])
        total += float(torch.dot(t.reshape(-1).double(), m.reshape(-1).double()) if t.numel() < (1 << 20)
                       else (t * m).sum(dtype=torch.float64))
    return total


@torch.no_grad()
def match_to(spec: MergeSpec, target: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], *,
             init: Mapping[str, torch.Tensor] | None = None, frozen: Sequence[str] = (), max_iter: int = 100,
             seed: int = 0, tol: float = 1e-12, restarts: int = 1,
             bar: tqdm | None = None) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Permutations of `state`'s groups that maximise its inner product with `target`.

    Coordinate descent finds a local optimum that depends on the order groups are visited in;
    with `restarts` > 1 it runs from the same start in that many seeded orders and keeps the
    best objective (measured on the digits MLPs: about +1 point of merged accuracy).

    Returns the permutations and the objective after each sweep (of the kept run). `bar`, a
    progress bar, advances by one per sweep.
    """
    best = None
    for r in range(max(1, restarts)):
        run = _descend(spec, target, state, init=init, frozen=frozen, max_iter=max_iter, seed=seed + 7919 * r, tol=tol,
                       bar=bar)
        if best is None or run[1][-1] > best[1][-1]:
            best = run
    return best


def _descend(spec, target, state, *, init, frozen, max_iter, seed, tol, bar=None):
    perms = {k: v.clone() for k, v in (init or signature_perms(spec, target, state, frozen)).items()}
    nested = nested_groups(spec)
    order = [g for g in spec.groups if g.name not in frozen]
    inputs = _cost_inputs(spec, nested)
    rng = np.random.default_rng(seed)
    workspace = Workspace()
    # per group: the permutations its cost was computed from, and what its assignment chose then. A
    # group none of whose inputs changed since would compute the same cost and choose the same again
    # (the products and the assignment are deterministic), so that visit reuses the choice: exact,
    # and the last sweep, which only confirms, skips most of the products.
    last: dict[str, tuple[list[torch.Tensor], torch.Tensor, dict]] = {}
    history = [objective(spec, target, state, perms)]
    for _ in range(max_iter):
        changed = False
        for i in rng.permutation(len(order)):
            group = order[i]
            seen = [perms[name] for name in inputs[group.name]]
            memo = last.get(group.name)
            if memo is not None and all(torch.equal(a, b) for a, b in zip(memo[0], seen)):
                new, nested_perms = memo[1], memo[2]
            else:
                pairs = [(d, dms) for d, dms in nested[group.name] if d.name not in frozen]
                cost, inner = _group_cost(spec, group, pairs, target, state, perms, workspace)
                if inner:
                    new, nested_perms = _solve_nested(group, cost, inner)
                else:
                    new, nested_perms = linear_assignment(cost, maximize=True)[1], {}
                last[group.name] = ([p.clone() for p in seen], new, nested_perms)
            for name, p in nested_perms.items():
                changed |= not torch.equal(perms[name], p)
                perms[name] = p
            changed |= not torch.equal(perms[group.name], new)
            perms[group.name] = new
        # a sweep that changed nothing has the objective it began with (a pass over the model saved)
        history.append(objective(spec, target, state, perms) if changed else history[-1])
        if bar is not None:
            bar.update(1)
        if not changed or history[-1] - history[-2] <= tol * abs(history[-2]):
            break
    return perms, history


def _cost_inputs(spec: MergeSpec, nested: dict) -> dict[str, list[str]]:
    """For each group, the other groups whose permutations its cost depends on: those with a
    member on one of its member tensors, less itself and the groups nested in it (which its own
    assignment chooses; a frozen nested group is applied to the cost but never changes)."""
    on_tensor: dict[str, set[str]] = {}
    for g in spec.groups:
        for m in g.members:
            on_tensor.setdefault(m.tensor, set()).add(g.name)
    inputs = {}
    for g in spec.groups:
        skip = {g.name} | {d.name for d, _ in nested[g.name]}
        touching = set().union(*(on_tensor[t] for t in _member_tensors([g])))
        inputs[g.name] = sorted(touching - skip)
    return inputs


@timed("weight matching")
@torch.no_grad()
def weight_matching(spec: MergeSpec, states: Sequence[Mapping[str, torch.Tensor]], *, reference: int = 0,
                    max_iter: int = 100, seed: int = 0, merge_many: bool | None = None, restarts: int = 1,
                    frozen: Mapping[str, torch.Tensor] | None = None,
                    progress: bool = False) -> tuple[list[dict], dict]:
    """Permutations aligning every model to the reference (two models) or, for more models, to the
    mean of the others (MergeMany) until no permutation changes.

    Args:
        frozen: {group: (n, count, size)} permutations fixed by another method (activation
            matching); weight matching then only chooses the remaining groups.
        progress: a bar counting the coordinate-descent sweeps.

    Returns:
        (per-model permutations, diagnostics with the objective history)
    """
    n = len(states)
    frozen = frozen or {}
    frozen_names = list(frozen)
    perms = []
    for i in range(n):
        # start each model from the signature matching to the reference (see signature_perms)
        p = identity_perms(spec, _device_of(states[i])) if i == reference else signature_perms(spec, states[reference], states[i], frozen_names)
        for name, stacked in frozen.items():
            p[name] = stacked[i].to(_device_of(states[i]))
        perms.append(p)
    merge_many = n > 2 if merge_many is None else merge_many
    diagnostics: dict = {"history": {}}
    others = [i for i in range(n) if i != reference]
    with tqdm(desc="weight matching", unit="sweep", disable=not progress, leave=False) as bar:
        if not merge_many:
            for i in others:
                perms[i], hist = match_to(spec, states[reference], states[i], init=perms[i], frozen=frozen_names,
                                          max_iter=max_iter, seed=seed + i, restarts=restarts, bar=bar)
                diagnostics["history"][i] = hist
            return perms, diagnostics
        _merge_many(spec, states, perms, others, frozen_names, diagnostics, max_iter=max_iter, seed=seed,
                    restarts=restarts, bar=bar)
    return perms, diagnostics


def _merge_many(spec, states, perms, others, frozen_names, diagnostics, *, max_iter, seed, restarts, bar) -> None:
    """MergeMany: each model against the mean of the others, round after round (perms in place)."""
    n = len(states)
    names = _member_tensors(spec.groups)
    for round_ in range(max_iter):
        changed = False
        for i in others:
            aligned = [apply_transforms(spec, {k: states[j][k] for k in names}, perms[j]) for j in range(n) if j != i]
            target = {k: sum(a[k].double() for a in aligned) / len(aligned) for k in names}
            new, hist = match_to(spec, target, states[i], init=perms[i], frozen=frozen_names, max_iter=max_iter,
                                 seed=seed + 1000 * round_ + i, restarts=restarts, bar=bar)
            diagnostics["history"].setdefault(i, []).extend(hist)
            changed |= any(not torch.equal(new[k], perms[i][k]) for k in new)
            perms[i] = new
        if not changed:
            break
    diagnostics["rounds"] = round_ + 1
