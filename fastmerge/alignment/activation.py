"""Alignment from activation statistics: permute (matching), CCA Merge, ZipIt (ALGORITHMS.md 2, 4, 5)."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import InvalidArgumentError
from ..ops import linear_assignment
from ..spec.residual import ones_complement


def match_permutation(rho: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Permutation of model i's units (columns of the cross-correlation with the reference) that
    maximises the total matched correlation; returns it as (1, size) and the mean matched value."""
    _, cols = linear_assignment(rho, maximize=True)
    return cols[None, :], float(rho[torch.arange(rho.shape[0], device=rho.device), cols].mean()) if rho.numel() else 0.0


def permutation_matrices(perms: torch.Tensor) -> torch.Tensor:
    """(count, size) permutations -> (count, size, size) float64 matrices P with P[u, perm[u]] = 1
    (new unit u is old unit perm[u]: a permutation as a dense transform)."""
    count, size = perms.shape
    out = torch.zeros(count, size, size, dtype=torch.float64, device=perms.device)
    out[torch.arange(count, device=perms.device)[:, None], torch.arange(size, device=perms.device)[None, :], perms] = 1.0
    return out


def _polar(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """U V^T and the singular values (descending) of M = U diag(r) V^T.

    Through one eigh of M^T M: U V^T = M (M^T M)^-1/2 (about twice as fast as an SVD here). When
    M is nearly singular the polar factor is not determined by that formula (dead units): then an
    SVD gives an orthogonal one."""
    evals, v = torch.linalg.eigh(m.T @ m)
    if m.numel() and evals[0] > 1e-12 * evals[-1] and evals[-1] > 0:
        sig = evals.sqrt()
        return (m @ (v / sig)) @ v.T, sig.flip(0)
    u, r, vh = torch.linalg.svd(m)
    return u @ vh, r


def _polar_towards_identity(m: torch.Tensor, vx: torch.Tensor, vy: torch.Tensor,
                            reference: torch.Tensor | None = None) -> torch.Tensor:
    """The polar factor of a rank-deficient M~ (dead units: a zero row/column of S_xy) with a
    deterministic null-space part. On M's range the polar factor is unique; on the null spaces any
    orthogonal map would do, and an SVD picks one that jumps with rounding (measured: statistics
    summed in another order changed T by more than its largest entry). Here the null spaces are
    mapped by the orthogonal map closest to a reference F, which depends only on the subspaces,
    not on the bases a decomposition returns. F = B + 0.1 G: B the activation matching's permutation
    when given (it pairs dead units by their incoming weights, so a dead unit stays one dead unit: a
    rotation among dead units' pre-activations can wake them), else I; G a fixed seeded Gaussian
    matrix (B alone would leave the choice open when the dead units of the two models differ)."""
    m_units = vx @ m @ vy.T  # the same matrix in unit coordinates
    u, sing, vh = torch.linalg.svd(m_units)
    k = int((sing > 1e-9 * sing[0]).sum()) if sing.numel() and sing[0] > 0 else 0
    q = u[:, :k] @ vh[:k]
    left, right = u[:, k:], vh[k:].T
    if left.shape[1]:
        n = m_units.shape[0]
        # the generic term keeps left^T F right full rank (its polar factor unique) even where the
        # matching put a dead unit of one model against a live one of the other
        gen = torch.Generator().manual_seed(12345)
        generic = 0.1 * torch.randn(n, n, generator=gen, dtype=m_units.dtype) / n**0.5
        base = torch.eye(n, dtype=m_units.dtype) if reference is None else reference.to(dtype=m_units.dtype, device="cpu")
        a, _, b = torch.linalg.svd(left.T @ (base + generic).to(m_units.device) @ right)
        q = q + left @ (a @ b) @ right.T
    return vx.T @ q @ vy


def cca_transform(s_xx: torch.Tensor, s_yy: torch.Tensor, s_xy: torch.Tensor, *, reg: float = 0.1,
                  relative: bool = True, eigh_xx=None, eigh_yy=None,
                  null_reference: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CCA Merge transform of model y's units into the reference x's basis.

    With S_xx = Sigma_xx + g I and S_yy = Sigma_yy + g I (g = reg * mean variance when relative),
    M = S_xx^-1/2 S_xy S_yy^-1/2 = U diag(r) V^T, the transform is
    T = S_xx^1/2 U V^T S_yy^-1/2 and its inverse T^-1 = S_yy^1/2 V U^T S_xx^-1/2 (built from the
    factors, never by inverting T). g -> 0 is exact CCA whitening; g -> inf gives the orthogonal
    Procrustes rotation U V^T of S_xy.

    eigh_xx / eigh_yy: eigendecompositions of Sigma_xx / Sigma_yy to reuse (the inverse square
    roots come from them through eigh, never from three SVDs).
    null_reference: (C, C) map of y's units to x's (the activation matching's permutation matrix)
        that decides the rotation between the null spaces of S_xy (dead units); see
        _polar_towards_identity.

    Returns:
        (T, T^-1, canonical correlations r), float64.
    """
    s_xx, s_yy, s_xy = s_xx.double(), s_yy.double(), s_xy.double()
    c = s_xx.shape[0]
    if reg < 0:
        raise InvalidArgumentError(f"CCA regularisation must be >= 0, got {reg}")
    scale = float((s_xx.diagonal().mean() + s_yy.diagonal().mean()) / 2) if c else 1.0
    g = reg * scale if relative else reg
    floor = 1e-12 * max(scale, 1e-300)
    ex, vx = eigh_xx if eigh_xx is not None else torch.linalg.eigh(s_xx)
    ey, vy = eigh_yy if eigh_yy is not None else torch.linalg.eigh(s_yy)
    lx = (ex.double() + g).clamp_min(floor)
    ly = (ey.double() + g).clamp_min(floor)
    vx, vy = vx.double(), vy.double()
    # Everything in the eigenbases of S_xx and S_yy (S^p = V diag(l^p) V^T): with
    # M~ = l_x^-1/2 (V_x^T S_xy V_y) l_y^-1/2 and its polar factor R~ = U~ V~^T,
    # T = V_x l_x^1/2 R~ l_y^-1/2 V_y^T and T^-1 = V_y l_y^1/2 R~^T l_x^-1/2 V_x^T.
    m = (vx.T @ s_xy @ vy) * lx.rsqrt()[:, None] * ly.rsqrt()[None, :]
    rotation, r = _polar(m)
    if r.numel() and r[-1] <= 1e-9 * r[0]:
        rotation = _polar_towards_identity(m, vx, vy, null_reference)
    t = (vx * lx.sqrt()) @ (rotation * ly.rsqrt()[None, :]) @ vy.T
    t_inv = (vy * ly.sqrt()) @ (rotation.T * lx.rsqrt()[None, :]) @ vx.T
    return t, t_inv, r


def orthogonal_transform(s_xy: torch.Tensor, *, fix_ones: bool = False) -> torch.Tensor:
    """The orthogonal Q that best maps model y's units onto the reference x's (orthogonal
    Procrustes, CCA's limit of infinite regularisation): Q = polar factor of S_xy (a
    cross-covariance or second moment), maximising tr(Q^T S_xy), so x ~ Q y. With `fix_ones`, Q maps
    the all-ones vector to itself and is the best such map on the mean-free vectors (what a
    canonical LayerNorm stream allows, fastmerge.spec.residual). float64."""
    s_xy = s_xy.double()
    size = s_xy.shape[0]
    if not fix_ones or size < 2:
        return _polar(s_xy)[0] if size else s_xy
    basis = ones_complement(size, device=s_xy.device)
    inner = _polar(basis.T @ s_xy @ basis)[0]
    return basis @ inner @ basis.T + torch.full((size, size), 1.0 / size, dtype=torch.float64, device=s_xy.device)


def zipit_matrices(rho: np.ndarray, num_models: int, size: int, *, alpha: float = 0.5,
                   beta: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """ZipIt's greedy merge of n*C features into C on their joint correlation.

    The most correlated pair of features (or merged features) is merged first; a merged feature's
    similarity to the rest is the minimum of its parents' times alpha. Merges that join two
    features of the same model (two clusters both holding one of its features) are allowed up to
    beta * (nC - C) / n per model (beta = 0: none, so a cluster holds at most one feature per model).

    Returns:
        merge M (C, nC) averaging the features of each merged unit, and unmerge U (nC, C) with
        U[f, k] = 1 when feature f went into merged unit k.
    """
    n_total = num_models * size
    if rho.shape != (n_total, n_total):
        raise InvalidArgumentError(f"zipit: joint correlation must be ({n_total}, {n_total}), got {rho.shape}")
    if not (0 < alpha <= 1) or not (0 <= beta <= 1):
        raise InvalidArgumentError(f"zipit: need 0 < alpha <= 1 and 0 <= beta <= 1, got alpha={alpha}, beta={beta}")
    # raw: similarities by the min-rule; sim: the same with the merges that are not allowed at -inf.
    # A merge joins two features of one model when both clusters hold a feature of it (clusters
    # count their features per model); that is allowed while the model's budget lasts. Beta = 0
    # therefore keeps at most one feature of each model in a cluster: two merged clusters of
    # different models' features cannot merge again, even when nothing else correlates (dead units
    # would otherwise leave live clusters to absorb each other).
    raw = np.array(rho, dtype=np.float64)
    np.fill_diagonal(raw, -np.inf)
    has = np.zeros((n_total, num_models), dtype=bool)  # has[c, m]: cluster c holds a feature of model m
    has[np.arange(n_total), np.repeat(np.arange(num_models), size)] = True
    budget = np.full(num_models, math.floor(beta * (n_total - size) / num_models), dtype=np.int64)
    active = np.ones(n_total, dtype=bool)
    relaxed = [False]  # set when the greedy order left no admissible merge (more than two models)

    def masked_row(x: int) -> np.ndarray:
        row = raw[x].copy()
        row[~active] = -np.inf
        spent = has[x] & (budget <= 0) & (not relaxed[0])  # models of x whose within-model merges are used up
        if spent.any():
            row[has[:, spent].any(axis=1)] = -np.inf
        return row

    sim = np.stack([masked_row(x) for x in range(n_total)]) if n_total else raw
    members = [[f] for f in range(n_total)]
    best = sim.max(axis=1) if n_total else np.zeros(0)
    best_idx = sim.argmax(axis=1) if n_total else np.zeros(0, dtype=np.int64)
    for _ in range(n_total - size):
        a = int(np.argmax(np.where(active, best, -np.inf)))
        if not np.isfinite(best[a]) and not relaxed[0]:
            # With more than two models the greedy order can leave clusters that all share a model
            # (a perfect one-per-model partition is not guaranteed); the remaining merges then go
            # by similarity alone, as in ZipIt's reference implementation.
            relaxed[0] = True
            sim = np.stack([masked_row(x) if active[x] else np.full(n_total, -np.inf) for x in range(n_total)])
            best, best_idx = sim.max(axis=1), sim.argmax(axis=1)
            a = int(np.argmax(np.where(active, best, -np.inf)))
        if not np.isfinite(best[a]):
            raise InvalidArgumentError("zipit: no admissible merge left; raise beta to allow merges within a model")
        b = int(best_idx[a])
        shared = has[a] & has[b]
        merged = np.minimum(raw[a], raw[b]) * alpha
        merged[[a, b]] = -np.inf
        raw[a], raw[:, a] = merged, merged
        raw[b], raw[:, b] = -np.inf, -np.inf
        active[b] = False
        members[a] += members[b]
        has[a] |= has[b]
        has[b] = False
        budget[shared] -= 1
        # rows to recompute: the new cluster, every cluster of a model whose budget just ran out
        # (their merges with clusters of that model are no longer allowed), and those whose best
        # partner was a or b
        refresh = {a}
        exhausted = shared & (budget <= 0)
        if exhausted.any():
            refresh |= set(np.nonzero(active & has[:, exhausted].any(axis=1))[0].tolist())
        row = masked_row(a)
        sim[a], sim[:, a] = row, row
        sim[b], sim[:, b] = -np.inf, -np.inf
        best[b] = -np.inf
        for x in refresh - {a}:
            sim[x] = masked_row(x)
            sim[:, x] = sim[x]
        refresh |= set(np.nonzero(active & ((best_idx == a) | (best_idx == b)))[0].tolist())
        raised = np.nonzero(active & (sim[:, a] > best))[0]
        best[raised], best_idx[raised] = sim[raised, a], a
        for x in refresh:
            if active[x]:
                best[x], best_idx[x] = sim[x].max(), sim[x].argmax()
    clusters = [members[c] for c in np.nonzero(active)[0]]
    # keep the reference model's order where it is in the cluster
    clusters.sort(key=lambda cl: min(cl))
    merge = np.zeros((size, n_total))
    unmerge = np.zeros((n_total, size))
    for k, cl in enumerate(clusters):
        merge[k, cl] = 1.0 / len(cl)
        unmerge[cl, k] = 1.0
    return merge, unmerge
