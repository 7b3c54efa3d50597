"""Streaming activation covariance: float64 state, centred per-batch products, Chan merges.

One state covers k feature blocks (typically one per model at one tap point) and keeps the second
moments of only the block pairs a method needs: ``"all_to_one"`` (ref-ref, ref-i, i-i: permute,
CCA, REPAIR), ``"full"`` (every pair: the joint matrix ZipIt needs), ``"diagonal"`` (each block
alone) or an explicit list of pairs.

Example:
    >>> state = CovarianceState([64, 64], pairs="all_to_one")
    >>> for xa, xb in batches:            # (B, 64) features of model 0 and model 1
    ...     state.update(xa, xb)
    >>> rho = state.correlation(0, 1)     # (64, 64), float64
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from .. import _ext
from ..errors import InvalidArgumentError, NonFiniteError, ShapeMismatchError

Pair = tuple[int, int]


def resolve_pairs(num_blocks: int, pairs: str | Sequence[Pair], reference: int = 0) -> list[Pair]:
    """Turns a pair preset into the explicit list of kept (left, right) block pairs."""
    if not 0 <= reference < num_blocks:
        raise InvalidArgumentError(f"reference block {reference} is outside [0, {num_blocks})")
    if pairs == "all_to_one":
        kept = [(reference, reference)]
        for i in range(num_blocks):
            if i != reference:
                kept += [(reference, i), (i, i)]
        return kept
    if pairs == "full":
        return [(i, j) for i in range(num_blocks) for j in range(i, num_blocks)]
    if pairs == "diagonal":
        return [(i, i) for i in range(num_blocks)]
    if isinstance(pairs, str):
        raise InvalidArgumentError(f"unknown pair preset {pairs!r}; use 'all_to_one', 'full', 'diagonal' or a list of pairs")
    kept = [(int(a), int(b)) for a, b in pairs]
    for a, b in kept:
        if not (0 <= a < num_blocks and 0 <= b < num_blocks):
            raise InvalidArgumentError(f"pair ({a}, {b}) names a block outside [0, {num_blocks})")
    if len(set(kept)) != len(kept):
        raise InvalidArgumentError(f"pairs contain duplicates: {kept}")
    return kept


class CovarianceState:
    """Running float64 count, means and centred second moments of k feature blocks.

    Args:
        widths: number of units C_b of each block.
        pairs: which block pairs to keep (see the module docstring).
        reference: the reference block of ``"all_to_one"``.
        device: where the state lives (the features' device).
    """

    def __init__(
        self,
        widths: Sequence[int],
        *,
        pairs: str | Sequence[Pair] = "all_to_one",
        reference: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        if len(widths) == 0:
            raise InvalidArgumentError("CovarianceState needs at least one feature block")
        self.widths = [int(w) for w in widths]
        self.pairs = resolve_pairs(len(self.widths), pairs, reference)
        f64 = dict(dtype=torch.float64, device=device)
        self.count = torch.zeros((), **f64)
        self.mean = [torch.zeros(w, **f64) for w in self.widths]
        self.m2 = [torch.zeros(self.widths[a], self.widths[b], **f64) for a, b in self.pairs]

    @property
    def num_samples(self) -> int:
        return int(self.count.item())

    def _index(self, left: int, right: int) -> tuple[int, bool]:
        """Position of the kept pair (left, right) and whether it is stored transposed."""
        for p, pair in enumerate(self.pairs):
            if pair == (left, right):
                return p, False
        for p, pair in enumerate(self.pairs):
            if pair == (right, left):
                return p, True
        raise InvalidArgumentError(
            f"block pair ({left}, {right}) is not kept by this state (kept: {self.pairs}); "
            "create the state with pairs='full' or list the pair explicitly"
        )

    def update(self, *features: torch.Tensor) -> None:
        """Folds one batch into the state: one (B, C_b) tensor per block, the same B for all.

        Conv features (B, C, H, W) must be flattened by the caller to (B*H*W, C). float32, float16
        and bfloat16 are read as they are; centred products run in float32 for large batches and
        in float64 for small ones (and for float64 input). The state is always float64.

        On CUDA nothing waits for the host: a NaN or Inf in the batch is not detected here (that
        would cost a synchronisation per batch) but poisons the state, and the first read
        (``covariance``, ``correlation``) raises NonFiniteError.

        Raises:
            ShapeMismatchError: wrong number of blocks, widths or sample counts.
            NonFiniteError: a NaN or Inf in the batch (CPU: raised here, the state is left unchanged).
        """
        self._check_features(features)
        if _ext.load():
            try:
                torch.ops.fastmerge.cov_update_(
                    self.count, self.mean, self.m2, list(features), [a for a, _ in self.pairs], [b for _, b in self.pairs]
                )
            except ValueError as exc:
                if "non-finite" in str(exc):
                    raise NonFiniteError(str(exc)) from None
                raise
        else:
            _ext.warn_fallback()
            cov_update_reference(self.count, self.mean, self.m2, features, self.pairs)

    def _check_features(self, features: Sequence[torch.Tensor]) -> None:
        if len(features) != len(self.widths):
            raise ShapeMismatchError(f"update got {len(features)} feature blocks, the state has {len(self.widths)}")
        rows = None
        for b, (x, width) in enumerate(zip(features, self.widths)):
            if x.dim() != 2 or x.shape[1] != width:
                raise ShapeMismatchError(
                    f"features[{b}] has shape {tuple(x.shape)}, expected (samples, {width}); "
                    "flatten conv features (B, C, H, W) to (B*H*W, C) first"
                )
            if not x.is_floating_point():
                raise ShapeMismatchError(f"features[{b}] must be floating point, got {x.dtype}")
            if rows is not None and x.shape[0] != rows:
                raise ShapeMismatchError(f"features[{b}] has {x.shape[0]} samples, features[0] has {rows}")
            rows = x.shape[0]

    def merge_(self, other: CovarianceState) -> CovarianceState:
        """Adds another state's samples to this one (Chan's formula); e.g. across data-parallel ranks."""
        if other.widths != self.widths or other.pairs != self.pairs:
            raise ShapeMismatchError(
                f"cannot merge states of widths/pairs {other.widths}/{other.pairs} into {self.widths}/{self.pairs}"
            )
        n_a, n_b = self.count.item(), other.count.item()
        n = n_a + n_b
        if n_b == 0:
            return self
        delta = [mo - ms for ms, mo in zip(self.mean, other.mean)]
        factor = n_a * n_b / n
        for p, (a, b) in enumerate(self.pairs):
            self.m2[p] += other.m2[p] + torch.outer(delta[a], delta[b]) * factor
        for mean, d in zip(self.mean, delta):
            mean += d * (n_b / n)
        self.count.fill_(n)
        return self

    def all_reduce_(self, group=None) -> CovarianceState:
        """Combines the states of every rank of a torch.distributed process group into the state of
        all their samples, on every rank (each rank accumulated its own shard of the data).

        Exact, not a sum of float32 moments: with n = sum n_r and mean = sum n_r mean_r / n (two
        float64 all_reduces), M2 = sum_r [M2_r + n_r (mean_r - mean)(mean_r' - mean')^T] (a third),
        which is Chan's merge of all ranks at once. Every rank gets bit-identical results. The
        state must live on a device the backend handles (CPU for gloo, CUDA for NCCL).
        """
        if not (dist.is_available() and dist.is_initialized()):
            raise InvalidArgumentError("all_reduce_ needs an initialised torch.distributed process group")
        n_r = self.count.clone()
        total = self.count.clone()
        dist.all_reduce(total, group=group)
        if float(total) == 0:
            return self
        weighted = torch.cat([m * n_r for m in self.mean]) if self.mean else torch.zeros(0, dtype=torch.float64)
        dist.all_reduce(weighted, group=group)
        mean = list(torch.split(weighted / total, self.widths))
        delta = [m_r - m for m_r, m in zip(self.mean, mean)]
        parts = [m2 + torch.outer(delta[a], delta[b]) * n_r for m2, (a, b) in zip(self.m2, self.pairs)]
        flat = torch.cat([p.reshape(-1) for p in parts]) if parts else torch.zeros(0, dtype=torch.float64)
        dist.all_reduce(flat, group=group)
        offset = 0
        for p, m2 in enumerate(self.m2):
            m2.copy_(flat[offset : offset + m2.numel()].view_as(m2))
            offset += m2.numel()
        for m, new in zip(self.mean, mean):
            m.copy_(new)
        self.count.copy_(total)
        return self

    def covariance(self, left: int = 0, right: int | None = None, *, ddof: int = 1) -> torch.Tensor:
        """Covariance block Sigma_{left,right} (C_left, C_right), float64; needs > ddof samples."""
        right = left if right is None else right
        p, transposed = self._index(left, right)
        self._check_finite()
        n = self.count.item()
        if n <= ddof:
            raise InvalidArgumentError(f"covariance needs more than {ddof} samples, the state has {int(n)}")
        block = self.m2[p] / (n - ddof)
        return block.T.clone() if transposed else block

    def _check_finite(self) -> None:
        # CUDA updates do not check their batches (see update); a non-finite value reaches the means.
        if self.count.device.type != "cpu" and not all(bool(torch.isfinite(m).all()) for m in self.mean):
            bad = [b for b, m in enumerate(self.mean) if not bool(torch.isfinite(m).all())]
            raise NonFiniteError(
                f"the statistics hold non-finite values (NaN or Inf) in block(s) {bad}: a batch folded into this "
                "state had NaN/Inf activations; check the model's weights and inputs, and capture in float32"
            )

    def correlation(self, left: int = 0, right: int | None = None) -> torch.Tensor:
        """Correlation block rho_{left,right} in [-1, 1]; units with zero variance get 0, never NaN."""
        right = left if right is None else right
        cov = self.covariance(left, right)
        std_l = self._std(left)
        std_r = self._std(right)
        return correlation_from_covariance(cov, std_l, std_r)

    def _std(self, block: int) -> torch.Tensor:
        p, _ = self._index(block, block)
        return (self.m2[p].diagonal() / (self.count - 1)).clamp_min(0).sqrt()

    def joint_covariance(self) -> torch.Tensor:
        """The (sum C, sum C) covariance of all blocks; needs every pair (``pairs="full"``)."""
        rows = [torch.cat([self.covariance(a, b) for b in range(len(self.widths))], dim=1) for a in range(len(self.widths))]
        return torch.cat(rows, dim=0)

    def joint_correlation(self) -> torch.Tensor:
        cov = self.joint_covariance()
        std = cov.diagonal().clamp_min(0).sqrt()
        return correlation_from_covariance(cov, std, std)


def correlation_from_covariance(cov: torch.Tensor, std_left: torch.Tensor, std_right: torch.Tensor) -> torch.Tensor:
    """cov / outer(std_left, std_right), with 0 for dead units.

    A unit is dead when its std is below 1e-6 of the largest std of its own block (or is 0): the
    floor is per side, so blocks of very different scales (two models' features) stay comparable.
    """
    alive_l = _alive(std_left)
    alive_r = _alive(std_right)
    denom = torch.outer(torch.where(alive_l, std_left, 1.0), torch.where(alive_r, std_right, 1.0))
    rho = (cov / denom).clamp_(-1.0, 1.0)
    return rho * torch.outer(alive_l, alive_r)


def _alive(std: torch.Tensor) -> torch.Tensor:
    if std.numel() == 0:
        return std > 0
    return (std > 1e-6 * std.max()) & (std > 0)


def cov_update_reference(
    count: torch.Tensor,
    mean: Sequence[torch.Tensor],
    m2: Sequence[torch.Tensor],
    features: Sequence[torch.Tensor],
    pairs: Sequence[Pair],
) -> None:
    """Pure-torch float64 version of the cov_update_ op (the tests' reference and the fallback)."""
    rows = features[0].shape[0]
    if rows == 0:
        return
    x = [f.to(torch.float64) for f in features]
    for b, xb in enumerate(x):
        if not torch.isfinite(xb).all():
            raise NonFiniteError(f"cov_update_: non-finite value (NaN or Inf) in features[{b}]")
    batch_mean = [xb.mean(dim=0) for xb in x]
    centred = [xb - mb for xb, mb in zip(x, batch_mean)]
    n_a, n_b = count.item(), float(rows)
    n = n_a + n_b
    delta = [bm - m for bm, m in zip(batch_mean, mean)]
    for p, (a, b) in enumerate(pairs):
        m2[p] += centred[a].T @ centred[b] + torch.outer(delta[a], delta[b]) * (n_a * n_b / n)
    for m, d in zip(mean, delta):
        m += d * (n_b / n)
    count.fill_(n)
