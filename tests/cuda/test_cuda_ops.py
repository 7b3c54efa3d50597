"""The CUDA kernels of every engine op against float64 references and against the CPU kernels.

Skipped without a GPU or when the library was built without CUDA. The CPU tests (tests/ops/) fix
the semantics; here every case runs on the device and is compared with the same references.
"""

import subprocess
import sys

import pytest
import torch

from fastmerge import _ext
from fastmerge.errors import NonFiniteError
from fastmerge.ops import CovarianceState, combine, linear_assignment
from fastmerge.ops.assignment import linear_assignment_reference
from tests.helpers import rel_fro


def _cuda_ops_available() -> bool:
    if not torch.cuda.is_available() or not _ext.load():
        return False
    return "cuda=1" in torch.ops.fastmerge.build_info()


pytestmark = pytest.mark.skipif(not _cuda_ops_available(), reason="needs a GPU and the library built with CUDA")
CUDA = torch.device("cuda")
TOL = {torch.float64: 1e-13, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
SHAPES = [(5,), (3, 7), (0, 4), (1,), (4, 3, 2, 2), (70001,), (257, 129)]


def randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


# ----------------------------------------------------------------------------- combine


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_combine_scalar_weights_match_cpu_bit_for_bit(gen, k, dtype):
    models = [[randn(gen, *s, dtype=dtype) for s in SHAPES] for _ in range(k)]
    weights = torch.rand(k, generator=gen).tolist()
    on_cpu = combine(models, weights=weights)
    on_gpu = combine([[w.to(CUDA) for w in m] for m in models], weights=weights)
    for got, want, t in zip(on_gpu, on_cpu, range(len(SHAPES))):
        ref = sum(wj * m[t].double() for wj, m in zip(weights, models))
        assert got.device.type == "cuda" and got.dtype == dtype and got.shape == want.shape
        assert rel_fro(got.cpu(), ref) < TOL[dtype]
        assert torch.equal(got.cpu(), want), "CUDA and CPU round the same products in the same order"


@pytest.mark.parametrize("kind", ["entry", "channel", "tensor", "mixed"])
@pytest.mark.parametrize("coef_dtype", [torch.float32, torch.float64])
def test_combine_coefficients_and_backward(gen, kind, coef_dtype):
    k = 3
    models = [[randn(gen, *s) for s in SHAPES] for _ in range(k)]
    kinds = ["entry", "channel", "tensor"]

    def coef(w, t, j):
        chosen = kinds[(t + j) % 3] if kind == "mixed" else kind
        if chosen == "entry":
            return torch.rand(w.shape, generator=gen, dtype=coef_dtype)
        if chosen == "channel" and w.dim() > 0:
            return torch.rand((w.shape[0],) + (1,) * (w.dim() - 1), generator=gen, dtype=coef_dtype)
        return torch.rand((), generator=gen, dtype=coef_dtype)

    coefs = [[coef(w, t, j) for t, w in enumerate(models[j])] for j in range(k)]
    flat_w = [models[j][t] for t in range(len(SHAPES)) for j in range(k)]
    flat_c = [coefs[j][t] for t in range(len(SHAPES)) for j in range(k)]
    gpu_c = [c.to(CUDA).requires_grad_() for c in flat_c]
    out = torch.ops.fastmerge.combine([w.to(CUDA) for w in flat_w], gpu_c, [], k)
    grads = [randn(gen, *s) for s in SHAPES]
    torch.autograd.backward(out, [g.to(CUDA) for g in grads])
    for t in range(len(SHAPES)):
        ref = sum(flat_c[t * k + j].double() * flat_w[t * k + j].double() for j in range(k))
        assert rel_fro(out[t].detach().cpu(), ref) < 1e-6
        for j in range(k):
            c = flat_c[t * k + j]
            full = (grads[t].double() * flat_w[t * k + j].double())
            want = full.sum_to_size(c.shape) if c.dim() else full.sum()
            got = gpu_c[t * k + j].grad.cpu()
            assert got.dtype == coef_dtype and got.shape == c.shape
            assert rel_fro(got.double(), want) < 1e-6


def test_combine_gradcheck_float64():
    gen = torch.Generator().manual_seed(3)
    w = [randn(gen, 4, 3, dtype=torch.float64).to(CUDA) for _ in range(2)]
    c = [torch.rand(4, 1, generator=gen, dtype=torch.float64).to(CUDA).requires_grad_() for _ in range(2)]
    assert torch.autograd.gradcheck(lambda a, b: torch.ops.fastmerge.combine(w, [a, b], [], 2)[0], tuple(c))


def test_combine_out_and_opcheck(gen):
    models = [randn(gen, 40, 7).to(CUDA) for _ in range(2)]
    out = [torch.empty(40, 7, device=CUDA)]
    torch.ops.fastmerge.combine_out(models, [], [0.3, 0.7], 2, out)
    assert rel_fro(out[0].cpu(), 0.3 * models[0].cpu().double() + 0.7 * models[1].cpu().double()) < 1e-6
    cw = [torch.rand(40, 1, generator=gen, dtype=torch.float64).to(CUDA).requires_grad_() for _ in range(2)]
    w64 = [m.double() for m in models]
    torch.library.opcheck(torch.ops.fastmerge.combine.default, (w64, cw, [], 2))
    torch.library.opcheck(torch.ops.fastmerge.combine_out.default, (models, [], [0.5, 0.5], 2, out))
    torch.library.opcheck(torch.ops.fastmerge.combine_backward.default,
                          ([randn(gen, 40, 7, dtype=torch.float64).to(CUDA)], w64, [c.detach() for c in cw], 2))


# ----------------------------------------------------------------------------- sigmoid merge


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kind", ["entry", "channel", "tensor"])
def test_sigmoid_merge_and_backward(gen, dtype, kind):
    shapes = [(33, 17), (70001,), (4, 3, 3, 3)]
    a = [randn(gen, *s, dtype=dtype) for s in shapes]
    b = [randn(gen, *s, dtype=dtype) for s in shapes]
    def logit(s):
        if kind == "entry":
            return randn(gen, *s)
        if kind == "channel":
            return randn(gen, s[0], *([1] * (len(s) - 1)))
        return randn(gen, 1)
    logits = [logit(s) for s in shapes]
    gl = [l.to(CUDA).requires_grad_() for l in logits]
    out = torch.ops.fastmerge.sigmoid_merge([x.to(CUDA) for x in a], [x.to(CUDA) for x in b], gl)
    grads = [randn(gen, *s, dtype=dtype) for s in shapes]
    torch.autograd.backward(out, [g.to(CUDA) for g in grads])
    for t in range(len(shapes)):
        s = torch.sigmoid(logits[t].double())
        ref = s * a[t].double() + (1 - s) * b[t].double()
        assert rel_fro(out[t].detach().cpu(), ref) < TOL[dtype]
        full = grads[t].double() * (a[t].double() - b[t].double()) * s * (1 - s)
        want = full.sum_to_size(logits[t].shape) if kind != "tensor" else (grads[t].double() * (a[t].double() - b[t].double())).sum() * s * (1 - s)
        assert rel_fro(gl[t].grad.cpu().double(), want.reshape(logits[t].shape)) < max(TOL[dtype], 1e-6)


def test_sigmoid_merge_at_zero_is_the_uniform_average_bitwise(gen):
    a, b = randn(gen, 1000).to(CUDA), randn(gen, 1000).to(CUDA)
    merged = torch.ops.fastmerge.sigmoid_merge([a], [b], [torch.zeros(1000, device=CUDA)])[0]
    average = combine([[a], [b]], weights=[0.5, 0.5])[0]
    assert torch.equal(merged, average)


# ----------------------------------------------------------------------------- covariance


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("pairs", ["all_to_one", "full"])
@pytest.mark.parametrize("products", ["auto", "float"])  # float: SGEMM even where FP64 is fast
def test_covariance_streaming_matches_float64(gen, dtype, pairs, products, monkeypatch):
    monkeypatch.setenv("FASTMERGE_COV_PRODUCTS", products)
    widths = [37, 1104]  # the wide block is split into symmetric tiles; 1104 takes the 16-byte loads
    batches = [[(randn(gen, rows, w) * 0.3 + 5.0).to(dtype) for w in widths] for rows in (3000, 1, 700, 5000)]
    state = CovarianceState(widths, pairs=pairs, device=CUDA)
    for batch in batches:
        state.update(*[x.to(CUDA) for x in batch])
    union = [torch.cat([b[i] for b in batches]).double() for i in range(len(widths))]
    for left, right in state.pairs:
        ref = torch.cov(torch.cat([union[left], union[right]], 1).T)[: widths[left], widths[left]:] if left != right \
            else torch.cov(union[left].T)
        got = state.covariance(left, right).cpu()
        tol = 1e-9 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 1e-2)
        assert rel_fro(got, ref) < tol, (left, right)
        if left == right:
            assert torch.equal(got, got.T), "diagonal blocks are exactly symmetric"
    for i, u in enumerate(union):
        assert torch.allclose(state.mean[i].cpu(), u.mean(0), rtol=1e-12, atol=1e-12)


def test_covariance_accuracy_on_post_relu_features(gen):
    """The accuracy test of the CPU op: large mean, small spread, float32 products."""
    x = (torch.relu(randn(gen, 65536, 256)) * 0.01 + 20.0)
    state = CovarianceState([256], device=CUDA)
    for chunk in x.split(8192):
        state.update(chunk.to(CUDA))
    ref = torch.cov(x.double().T)
    assert rel_fro(state.covariance().cpu(), ref) < 1e-6


def test_covariance_nan_is_raised_when_read(gen):
    state = CovarianceState([4], device=CUDA)
    x = randn(gen, 50, 4)
    x[3, 2] = float("nan")
    state.update(x.to(CUDA))
    with pytest.raises(NonFiniteError):
        state.covariance()


def test_covariance_opcheck(gen):
    count = torch.zeros((), dtype=torch.float64, device=CUDA)
    mean = [torch.zeros(3, dtype=torch.float64, device=CUDA)]
    m2 = [torch.zeros(3, 3, dtype=torch.float64, device=CUDA)]
    torch.library.opcheck(torch.ops.fastmerge.cov_update_.default, (count, mean, m2, [randn(gen, 9, 3).to(CUDA)], [0], [0]))


# ----------------------------------------------------------------------------- transforms


def test_transform_axes_matches_cpu(gen):
    tensors = [randn(gen, 6, 5), randn(gen, 4, 6, 3), randn(gen, 8, 6)]
    perm = torch.randperm(6, generator=gen)
    dense = randn(gen, 6, 6)
    blocks = randn(gen, 2, 3, 3)
    transforms = [perm, dense, blocks, perm, dense]
    index, axis = [0, 1, 1, 2, 2], [0, 1, 1, 1, 1]
    want = torch.ops.fastmerge.transform_axes(tensors, transforms, index, axis)
    got = torch.ops.fastmerge.transform_axes([t.to(CUDA) for t in tensors], [m.to(CUDA) for m in transforms], index, axis)
    for g, w in zip(got, want):
        assert g.device.type == "cuda" and g.shape == w.shape
        assert rel_fro(g.cpu().double(), w.double()) < 1e-6
    # an index out of range: test_errors_raise_instead_of_crashing (in a child process)


# ----------------------------------------------------------------------------- assignment


def total(cost, rows, cols):
    return cost.double()[rows.cpu(), cols.cpu()].sum().item()


@pytest.mark.parametrize("shape", [(1, 1), (5, 5), (7, 12), (12, 7), (300, 300), (129, 500), (2500, 2500)])
@pytest.mark.parametrize("maximize", [False, True])
def test_assignment_is_optimal(gen, shape, maximize):
    cost = torch.rand(shape, generator=gen)
    rows, cols = linear_assignment(cost.to(CUDA), maximize=maximize)
    ref_rows, ref_cols = linear_assignment_reference(cost, maximize=maximize)
    assert rows.device.type == "cuda"
    assert torch.equal(rows.cpu(), ref_rows)
    assert abs(total(cost, rows, cols) - total(cost, ref_rows, ref_cols)) < 1e-9 * max(shape)
    assert len(set(cols.tolist())) == len(cols)


def test_assignment_degenerate_and_integer_costs(gen):
    for cost in [torch.zeros(64, 64), torch.ones(40, 90), torch.randint(0, 4, (200, 200), generator=gen).float()]:
        rows, cols = linear_assignment(cost.to(CUDA))
        ref_rows, ref_cols = linear_assignment_reference(cost)
        assert total(cost, rows, cols) == total(cost, ref_rows, ref_cols)
        assert len(set(cols.tolist())) == len(cols)


def test_assignment_batched_heads(gen):
    cost = torch.rand(64, 128, 128, generator=gen, dtype=torch.float64)
    rows, cols = linear_assignment(cost.to(CUDA), maximize=True)
    ref_rows, ref_cols = linear_assignment_reference(cost, maximize=True)
    for b in range(64):
        assert abs(total(cost[b], rows[b], cols[b]) - total(cost[b], ref_rows[b], ref_cols[b])) < 1e-9
    assert torch.equal(cols.cpu(), ref_cols), "random costs have a unique optimum"


def test_assignment_non_finite_and_opcheck(gen):
    cost = torch.rand(6, 6, generator=gen)
    cost[2, 4] = float("inf")
    with pytest.raises(NonFiniteError, match=r"\(2, 4\)"):
        linear_assignment(cost.to(CUDA))
    torch.library.opcheck(torch.ops.fastmerge.linear_assignment.default, (torch.rand(6, 9, device=CUDA), True))


def test_assignment_op_raises_on_non_finite_without_crashing():
    """The compiled op itself (no Python check before it), in a child process so a crash shows as
    a failure of this test instead of ending the run."""
    code = (
        "import torch, fastmerge; fastmerge._ext.load()\n"
        "c = torch.rand(2, 5, 7, device='cuda'); c[1, 3, 4] = float('nan')\n"
        "try:\n    torch.ops.fastmerge.linear_assignment(c, False)\nexcept ValueError as e:\n    print('raised', e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "raised" in done.stdout and "cost[1]" in done.stdout and "(3, 4)" in done.stdout, done.stdout


ERROR_CASES = {
    "cpu combine, mismatched shapes": "torch.ops.fastmerge.combine([torch.ones(3), torch.ones(4)], [], [0.5, 0.5], 2)",
    "cpu transform, index out of range": "torch.ops.fastmerge.transform_axes([torch.ones(3)], [torch.tensor([0, 5, 1])], [0], [0])",
    "cuda transform, index out of range":
        "torch.ops.fastmerge.transform_axes([torch.ones(3, device='cuda')], [torch.tensor([0, 5, 1], device='cuda')], [0], [0])",
    "cuda combine, coefficient on another device":
        "torch.ops.fastmerge.combine([torch.ones(3, device='cuda')] * 2, [torch.ones(3)] * 2, [], 2)",
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_errors_raise_instead_of_crashing(case):
    """Bad arguments raise a Python exception from the compiled library (run in a child process, so
    a crash fails this test instead of ending the run)."""
    code = (
        "import torch, fastmerge; fastmerge._ext.load()\n"
        f"try:\n    {ERROR_CASES[case]}\nexcept (RuntimeError, ValueError, IndexError) as e:\n    print('raised', type(e).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "raised" in done.stdout, (done.returncode, done.stderr[-1500:])
