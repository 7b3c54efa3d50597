"""Linear algebra: linear, addmm, mm/bmm/matmul, baddbmm and scaled dot-product attention."""

from __future__ import annotations

import torch

from ..layout import prune_families, replica
from ..trace_types import Info
from ..types import SpecError
from .base import _broadcast, _shape, handles, opaque_like, producer_of


@handles("linear")
def _linear(t, args, kwargs, meta):
    x, w = args[0], args[1]
    b = args[2] if len(args) > 2 else kwargs.get("bias")
    t.role(w, 0, "out")
    t.role(w, 1, "in")
    t.role(b, 0, "out")
    t.tap(x, -1, weight=w)
    t.unify(x.dims[-1], w.dims[1])
    out = [list(d) for d in x.dims[:-1]] + [list(w.dims[0])]
    if isinstance(b, Info):
        out[-1] = t.unify(out[-1], b.dims[0])
    return Info(out, _shape(meta), produced_by=producer_of(w, b))


@handles("addmm")
def _addmm(t, args, kwargs, meta):
    bias, a, b = args[0], args[1], args[2]
    t.role(b, 0, "in")
    t.role(b, 1, "out")
    t.role(bias, -1, "out")
    t.tap(a, -1)
    out = _matmul_dims(t, a, b)
    if isinstance(bias, Info) and bias.shape and bias.shape[-1] > 1:
        out[-1] = t.unify(out[-1], bias.dims[-1])
    return Info(out, _shape(meta))


def _shared_families(t, contracted: list, batch: list) -> list:
    """A contracted axis pairs element (.., e) of one operand with (.., e) of the other for every
    row/column combination; per-block (family) transforms on it are consistent only when the
    block index is a batch dim both operands share. Otherwise the blocks must share one."""
    return prune_families(t.table, contracted, t.where(), present_in=batch)


def _matmul_dims(t, a: Info, b: Info) -> list:
    """Layouts of a @ b with numpy broadcasting of batch dims; the contracted axes unify."""
    if not isinstance(a, Info) or not isinstance(b, Info):
        raise SpecError(f"{t.where()}: matrix product with an operand that is not a tensor")
    a_dims, b_dims = [list(d) for d in a.dims], [list(d) for d in b.dims]
    a_shape, b_shape = list(a.shape), list(b.shape)
    squeeze_a = squeeze_b = False
    if len(a_shape) == 1:
        a_dims, a_shape, squeeze_a = [[]] + a_dims, [1] + a_shape, True
    if len(b_shape) == 1:
        b_dims, b_shape, squeeze_b = b_dims + [[]], b_shape + [1], True
    # batch dims first: they carry the head index that the contracted families are indexed by
    batch_a, batch_b = a_dims[:-2], b_dims[:-2]
    n = max(len(batch_a), len(batch_b))
    batch_a = [[]] * (n - len(batch_a)) + batch_a
    batch_b = [[]] * (n - len(batch_b)) + batch_b
    sa = [1] * (n - len(a_shape[:-2])) + a_shape[:-2]
    sb = [1] * (n - len(b_shape[:-2])) + b_shape[:-2]
    batch = []
    for da, db, na, nb in zip(batch_a, batch_b, sa, sb):
        if na == 1:
            batch.append(db)
        elif nb == 1:
            batch.append(da)
        else:
            batch.append(t.unify(da, db))
    a_dims[-1], b_dims[-2] = _shared_families(t, [a_dims[-1], b_dims[-2]], batch)
    t.unify(a_dims[-1], b_dims[-2])
    out = batch + [a_dims[-2], b_dims[-1]]
    if squeeze_b:
        out.pop(-1)
    if squeeze_a:
        out.pop(-2 if not squeeze_b else -1)
    return out


@handles("mm", "bmm", "matmul")
def _mm(t, args, kwargs, meta):
    a, b = args[0], args[1]
    if isinstance(b, Info) and len(b.shape) >= 2:  # x @ W: W's rows meet x's units
        t.role(b, -2, "in")
        t.role(b, -1, "out")
    if isinstance(a, Info) and len(a.shape) >= 2:  # W @ x
        t.role(a, -2, "out")
        t.role(a, -1, "in")
    return Info(_matmul_dims(t, a, b), _shape(meta))


@handles("baddbmm")
def _baddbmm(t, args, kwargs, meta):
    bias, a, b = args[0], args[1], args[2]
    out = _matmul_dims(t, a, b)
    if isinstance(bias, Info):
        info = _broadcast(t, [Info(out, _shape(meta)), bias], meta)
        return info
    return Info(out, _shape(meta))


@handles("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
         "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
         "_scaled_dot_product_cudnn_attention")
def _sdpa(t, args, kwargs, meta):
    """softmax(q k^T + mask) v: batch dims shared by q, k, v (with K/V heads repeated for GQA),
    q and k dims contracted, keys aligned with values; the result has v's dims."""
    q, k, v = args[0], args[1], args[2]
    out_meta = meta[0] if isinstance(meta, (list, tuple)) else meta
    q_batch, k_batch, v_batch = q.dims[:-2], k.dims[:-2], v.dims[:-2]
    batch = []
    for i, (dq, dk, dv) in enumerate(zip(q_batch, k_batch, v_batch)):
        nq, nk = q.shape[i], k.shape[i]
        if nq != nk and nk > 1 and nq % nk == 0:  # grouped-query attention: K/V heads repeated
            dk = list(dk) + replica(nq // nk)
            dv = list(dv) + replica(nq // nk)
        merged = t.unify(t.unify(list(dq), dk), dv) if nq > 1 else list(dq)
        batch.append(merged)
    qd, kd = _shared_families(t, [list(q.dims[-1]), list(k.dims[-1])], batch)
    t.unify(qd, kd)
    kd2, vd = _shared_families(t, [list(k.dims[-2]), list(v.dims[-2])], batch)
    t.unify(kd2, vd)
    mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
    if isinstance(mask, Info):
        ref = Info(batch + [list(q.dims[-2]), list(k.dims[-2])], tuple(q.shape[:-1]) + (k.shape[-2],))
        _broadcast(t, [ref, mask], torch.empty(ref.shape, device="meta"))
    out = Info(batch + [list(q.dims[-2]), list(v.dims[-1])], _shape(out_meta))
    if isinstance(meta, (list, tuple)):
        return [out] + [opaque_like(m) for m in meta[1:]]
    return out
