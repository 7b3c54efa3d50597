"""Fused weighted combination and its backward against plain torch expressions."""

import pytest
import torch

from fastmerge.errors import ShapeMismatchError
from fastmerge.ops import combine, combine_reference
from tests.helpers import rel_fro

SHAPES = [(5,), (3, 7), (0, 4), (1,), (4, 3, 2, 2), (70000,)]  # the last spans several work chunks
TOL = {torch.float64: 1e-14, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def models_of(gen, k, shapes=SHAPES, dtype=torch.float32):
    return [[torch.randn(s, generator=gen).to(dtype) for s in shapes] for _ in range(k)]


def plain(models, coefs):
    """sum_j c_j * W_j in float64, the expression the op fuses."""
    return [sum(c[t] * m[t].double() if isinstance(c[t], float) else c[t].double() * m[t].double()
                for m, c in zip(models, coefs)) for t in range(len(models[0]))]


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_scalar_weights(gen, k, dtype):
    models = models_of(gen, k, dtype=dtype)
    weights = torch.rand(k, generator=gen).tolist()
    out = combine(models, weights=weights)
    want = plain(models, [[w] * len(SHAPES) for w in weights])
    for got, ref in zip(out, want):
        assert got.dtype == dtype and got.shape == ref.shape
        assert rel_fro(got, ref) < TOL[dtype]


def test_default_is_uniform_average(gen):
    models = models_of(gen, 3)
    out = combine(models)
    for t, got in enumerate(out):
        assert torch.allclose(got, (models[0][t] + models[1][t] + models[2][t]) / 3, atol=1e-6)


def coefficient_like(gen, w, kind, dtype=torch.float32):
    if kind == "entry":
        return torch.rand(w.shape, generator=gen, dtype=dtype)
    if kind == "channel":
        return torch.rand((w.shape[0],) + (1,) * (w.dim() - 1), generator=gen, dtype=dtype)
    if kind == "leading2" and w.dim() >= 2:
        return torch.rand(w.shape[:2] + (1,) * (w.dim() - 2), generator=gen, dtype=dtype)
    return torch.rand((), generator=gen, dtype=dtype)


@pytest.mark.parametrize("kind", ["entry", "channel", "leading2", "tensor", "mixed"])
@pytest.mark.parametrize("coef_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [3, 6])
def test_coefficient_tensors(gen, kind, coef_dtype, k):
    models = models_of(gen, k)
    kinds = ["entry", "channel", "leading2", "tensor"]
    coefs = [[coefficient_like(gen, w, kinds[(j + t) % 4] if kind == "mixed" else kind, coef_dtype)
              for t, w in enumerate(models[j])] for j in range(k)]
    out = combine(models, coefficients=coefs)
    for got, ref in zip(out, plain(models, coefs)):
        assert rel_fro(got, ref) < 1e-6


def test_non_contiguous_inputs(gen):
    a = torch.randn(6, 8, generator=gen)
    b = torch.randn(8, 6, generator=gen).T
    c = torch.randn(12, 8, generator=gen)[::2]
    coef = [[torch.rand(6, 8, generator=gen).T.contiguous().T] for _ in range(3)]  # strided coefficients
    out = combine([[a], [b], [c]], coefficients=coef)[0]
    assert torch.allclose(out, coef[0][0] * a + coef[1][0] * b + coef[2][0] * c, atol=1e-6)


def test_gradients_match_autograd_of_plain_expression(gen):
    # (64, 5) with per-channel coefficients has many runs (one reduction per run in parallel);
    # per-tensor coefficients on (3, 2, 2) are one long run (a parallel reduction).
    models = models_of(gen, 3, shapes=[(4, 5), (6,), (3, 2, 2), (64, 5)], dtype=torch.float64)
    kinds = ["entry", "channel", "tensor", "channel"]
    coefs = [[coefficient_like(gen, w, kinds[(j + t) % 4], torch.float64).requires_grad_() for t, w in enumerate(m)]
             for j, m in enumerate(models)]
    for m in models:
        for w in m:
            w.requires_grad_()
    upstream = [torch.randn(w.shape, generator=gen, dtype=torch.float64) for w in models[0]]
    out = combine(models, coefficients=coefs)
    fused = torch.autograd.grad(out, [c for cs in coefs for c in cs] + [w for m in models for w in m], upstream)
    ref = plain(models, coefs)
    expected = torch.autograd.grad(ref, [c for cs in coefs for c in cs] + [w for m in models for w in m], upstream)
    for got, want in zip(fused, expected):
        assert got.shape == want.shape
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_gradcheck_float64(gen):
    w = [torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    c_entry = torch.rand(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    c_channel = torch.rand(3, 1, generator=gen, dtype=torch.float64, requires_grad=True)

    def f(w0, w1, c0, c1):
        return combine([[w0], [w1]], coefficients=[[c0], [c1]])[0]

    assert torch.autograd.gradcheck(f, (w[0], w[1], c_entry, c_channel))
    assert torch.autograd.gradcheck(lambda a, b: combine([[a], [b]], weights=[0.25, -1.5])[0], (w[0], w[1]))


def test_np_merge_style_sigmoid_coefficients(gen):
    # NP Merge: alpha = sigmoid(a), W = alpha * W_A + (1 - alpha) * W_B. With a = 0 the result is the
    # uniform average, and the gradient reaching `a` equals the autograd of the plain expression.
    wa, wb = torch.randn(8, 5, generator=gen), torch.randn(8, 5, generator=gen)
    a = torch.zeros(8, 5, requires_grad=True)
    alpha = torch.sigmoid(a)
    merged = combine([[wa], [wb]], coefficients=[[alpha], [1 - alpha]])[0]
    assert torch.allclose(merged, (wa + wb) / 2, atol=1e-7)
    x = torch.randn(16, 5, generator=gen)
    loss = (x @ merged.T).square().mean()
    (grad,) = torch.autograd.grad(loss, a)
    a2 = torch.zeros(8, 5, requires_grad=True)
    al2 = torch.sigmoid(a2)
    loss2 = (x @ (al2 * wa + (1 - al2) * wb).T).square().mean()
    (grad2,) = torch.autograd.grad(loss2, a2)
    assert torch.allclose(grad, grad2, rtol=1e-5, atol=1e-7)


def test_inputs_untouched_and_reference_agrees(gen):
    models = models_of(gen, 2)
    before = [[w.clone() for w in m] for m in models]
    out = combine(models, weights=[0.3, 0.7])
    flat = [models[j][t] for t in range(len(SHAPES)) for j in range(2)]
    ref = combine_reference(flat, [], [0.3, 0.7], 2)
    for got, want in zip(out, ref):
        assert rel_fro(got, want) < 1e-6
    assert all(torch.equal(a, b) for ma, mb in zip(models, before) for a, b in zip(ma, mb))


def test_bad_inputs_raise_typed_errors(gen):
    a, b = torch.randn(3, 4), torch.randn(4, 3)
    with pytest.raises(ShapeMismatchError, match=r"tensor 0: model 1 has shape \(4, 3\)"):
        combine([[a], [b]])
    with pytest.raises(ShapeMismatchError, match="model 1 has 2 tensors"):
        combine([[a], [a, a]])
    with pytest.raises(ShapeMismatchError, match="weights has 3 entries for 2 models"):
        combine([[a], [a]], weights=[1, 2, 3])
    with pytest.raises(ShapeMismatchError, match=r"coefficients\[1\]\[0\].*\(1, 4\)"):
        combine([[a], [a]], coefficients=[[torch.rand(3, 4)], [torch.rand(1, 4)]])
    with pytest.raises(ShapeMismatchError, match="float32 or float64"):
        combine([[a], [a]], coefficients=[[torch.rand(3, 4).half()], [torch.rand(3, 4)]])
    with pytest.raises(ValueError, match="either weights or coefficients"):
        combine([[a], [a]], weights=[1, 1], coefficients=[[torch.rand(3, 4)], [torch.rand(3, 4)]])


def test_opcheck(gen):
    w = [torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    v = [torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    cw = [torch.rand(4, 1, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    cv = [torch.rand(5, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    samples = [
        ([w[0], w[1], v[0], v[1]], [cw[0], cw[1], cv[0], cv[1]], [], 2),
        ([w[0], w[1], v[0], v[1]], [], [0.5, 0.25], 2),
        ([torch.randn(7, generator=gen).half()] * 3, [], [1.0, 2.0, 3.0], 3),
    ]
    for args in samples:
        torch.library.opcheck(torch.ops.fastmerge.combine.default, args)
    grads = [torch.randn(4, 3, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)]
    torch.library.opcheck(torch.ops.fastmerge.combine_backward.default,
                          (grads, [w[0].detach(), w[1].detach(), v[0].detach(), v[1].detach()],
                           [c.detach() for c in (cw[0], cw[1], cv[0], cv[1])], 2))


def test_out_buffers_are_filled_in_place(gen):
    models = models_of(gen, 3, shapes=[(4, 5), (70000,)])
    coefs = [[coefficient_like(gen, w, "channel") for w in m] for m in models]
    out = [torch.full(w.shape, float("nan")) for w in models[0]]
    ptrs = [o.data_ptr() for o in out]
    returned = combine(models, coefficients=coefs, out=out)
    assert [o.data_ptr() for o in returned] == ptrs
    for got, want in zip(returned, combine(models, coefficients=coefs)):
        assert torch.equal(got, want)
    with pytest.raises(ShapeMismatchError, match=r"out\[0\] must be a contiguous torch.float32 tensor of shape \(4, 5\)"):
        combine(models, out=[torch.empty(5, 4), torch.empty(70000)])
    with pytest.raises(ShapeMismatchError, match="out has 1 tensors"):
        combine(models, out=[torch.empty(4, 5)])
    args = ([w for t in range(2) for w in (models[0][t], models[1][t], models[2][t])], [], [0.2, 0.3, 0.5], 3,
            [torch.empty(4, 5), torch.empty(70000)])
    torch.library.opcheck(torch.ops.fastmerge.combine_out.default, args)


def test_mixed_dtypes_across_tensors_in_one_call(gen):
    shapes_dtypes = [((6, 3), torch.float32), ((5,), torch.float16), ((4, 4), torch.bfloat16), ((7,), torch.float64)]
    models = [[torch.randn(s, generator=gen).to(d) for s, d in shapes_dtypes] for _ in range(2)]
    out = combine(models, weights=[0.25, 0.75])
    for (shape, dtype), got, ref in zip(shapes_dtypes, out, plain(models, [[0.25] * 4, [0.75] * 4])):
        assert got.dtype == dtype and rel_fro(got, ref) < TOL[dtype]


def test_works_under_torch_compile(gen):
    # The fake kernel and autograd registration let the op sit inside a compiled graph.
    wa, wb = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    a = torch.zeros(6, 1, requires_grad=True)

    def merged_loss(a):
        alpha = torch.sigmoid(a)
        return combine([[wa], [wb]], coefficients=[[alpha], [1 - alpha]])[0].square().sum()

    compiled = torch.compile(merged_loss, backend="aot_eager", fullgraph=True)
    (g_compiled,) = torch.autograd.grad(compiled(a), a)
    (g_eager,) = torch.autograd.grad(merged_loss(a), a)
    assert torch.allclose(g_compiled, g_eager)


def test_mixed_coefficient_dtypes_keep_float64_precision(gen):
    w = [torch.randn(50, generator=gen, dtype=torch.float64) for _ in range(2)]
    c64 = torch.full((50,), 1 / 3, dtype=torch.float64)
    c32 = torch.rand(50, generator=gen)
    out = combine([[w[0]], [w[1]]], coefficients=[[c32], [c64]])[0]
    assert torch.allclose(out, c32.double() * w[0] + c64 * w[1], rtol=1e-15, atol=1e-15)


def test_out_must_not_alias_inputs_and_tensors_must_be_floating(gen):
    from fastmerge.errors import InvalidArgumentError

    a, b = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    with pytest.raises(InvalidArgumentError, match="share memory"):
        combine([[a], [b]], out=[a])
    with pytest.raises(ShapeMismatchError, match="floating-point"):
        combine([[torch.arange(4)], [torch.arange(4)]])


def test_sigmoid_merge_forward_and_gradient(gen):
    from fastmerge.ops import sigmoid_merge

    shapes = [(6, 5), (7,), (3, 2, 2), (0, 4)]
    a = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    b = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    logits = [torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True) for s in shapes[:2]]
    logits += [torch.randn(3, 1, 1, generator=gen, dtype=torch.float64, requires_grad=True),
               torch.randn((), generator=gen, dtype=torch.float64, requires_grad=True)]
    out = sigmoid_merge(a, b, logits)
    plain = [y + torch.sigmoid(l) * (x - y) for x, y, l in zip(a, b, logits)]
    for got, want in zip(out, plain):
        assert torch.allclose(got, want, atol=1e-14)
    upstream = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    fused = torch.autograd.grad(out, logits, upstream, allow_unused=True)
    ref = torch.autograd.grad(plain, logits, upstream, allow_unused=True)
    for got, want in zip(fused, ref):
        assert torch.allclose(got, want, atol=1e-12)
    assert torch.autograd.gradcheck(lambda l0, l2: sigmoid_merge(a[:1] + a[2:3], b[:1] + b[2:3], [l0, l2]),
                                    (logits[0], logits[2]))
    # float32 weights with float32 logits (the NP Merge case), and half weights
    for dtype in (torch.float32, torch.bfloat16):
        x, y = torch.randn(8, 3, generator=gen).to(dtype), torch.randn(8, 3, generator=gen).to(dtype)
        lg = torch.randn(8, 3, generator=gen)
        got = sigmoid_merge([x], [y], [lg])[0]
        want = y.double() + torch.sigmoid(lg.double()) * (x.double() - y.double())
        assert got.dtype == dtype and rel_fro(got, want) < TOL[dtype]


def test_sigmoid_merge_opcheck(gen):
    a = [torch.randn(4, 3, generator=gen), torch.randn(5, generator=gen)]
    b = [torch.randn(4, 3, generator=gen), torch.randn(5, generator=gen)]
    logits = [torch.randn(4, 3, generator=gen, requires_grad=True), torch.randn(1, generator=gen, requires_grad=True)]
    torch.library.opcheck(torch.ops.fastmerge.sigmoid_merge.default, (a, b, logits))
    grads = [torch.randn(4, 3, generator=gen), torch.randn(5, generator=gen)]
    torch.library.opcheck(torch.ops.fastmerge.sigmoid_merge_backward.default,
                          (grads, a, b, [l.detach() for l in logits]))
