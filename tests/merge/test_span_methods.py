"""SLERP, Model Stock, NuSLERP, Multi-SLERP and Karcher from the inputs' Gram matrix (methods/span.py):
against mergekit's formulas evaluated in float64 (the replicas that --mergekit-compat runs), within
about one float32 rounding, and at least as close as mergekit's own float32 arithmetic; the edge
cases (parallel, opposite, zero tensors) as mergekit handles them."""

from dataclasses import replace

import pytest
import torch

from fastmerge.errors import InvalidArgumentError
from fastmerge.merging.methods.base import get_method
from fastmerge.merging.same_init import SameInitOptions

EPS32 = torch.finfo(torch.float32).eps

CASES = {
    "slerp": (2, False, {"t": 0.3}),
    "slerp, near the line": (2, False, {"t": 0.7}),
    "model_stock": (3, True, {}),
    "nuslerp": (2, False, {"weights": (0.3, 0.9)}),
    "nuslerp with base": (2, True, {"weights": (1.0, 2.0)}),
    "multislerp": (3, False, {"weights": (0.5, 0.3, 0.2)}),
    "multislerp with base, unnormalised": (3, True, {"weights": (1.0, 2.0, 1.0), "normalize": False}),
    "karcher": (3, False, {}),
    "karcher, 3 steps": (2, False, {"max_iter": 3, "tol": 1e-3}),
}


def _merge(method: str, tensors, base, options: SameInitOptions, compat: bool = False) -> torch.Tensor:
    options = replace(options, mergekit_compat=compat)
    return get_method(method).merge("w", list(tensors), base, options, tensors[0].dtype, None)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("spread", [0.02, 1.0])
def test_closer_to_the_exact_value_than_mergekits_float32_arithmetic(case, spread):
    count, with_base, kwargs = CASES[case]
    method = case.split()[0].rstrip(",")
    generator = torch.Generator().manual_seed(len(case))
    base = torch.randn(257, 130, generator=generator) * 0.02
    tensors = [base + spread * 0.02 * torch.randn(257, 130, generator=generator) for _ in range(count)]
    options = SameInitOptions(method=method, **kwargs)
    b = base if with_base else None
    exact = _merge(method, [t.double() for t in tensors], b.double() if with_base else None, options, compat=True)
    ours = _merge(method, tensors, b, options)
    theirs = _merge(method, tensors, b, options, compat=True)  # mergekit's float32 operations
    scale = float(exact.abs().max())
    our_error = float((ours.double() - exact).abs().max()) / (EPS32 * scale)
    their_error = float((theirs.double() - exact).abs().max()) / (EPS32 * scale)
    assert ours.dtype == torch.float32 and ours.shape == base.shape
    assert our_error <= 1.5, our_error
    assert our_error <= their_error + 0.5, (our_error, their_error)


def test_bfloat16_inputs_stay_within_one_rounding_of_the_exact_value():
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(300, 200, generator=generator) * 0.02
    tensors = [(base + 0.002 * torch.randn(300, 200, generator=generator)) for _ in range(3)]
    for method, with_base in (("model_stock", True), ("multislerp", False), ("karcher", False)):
        options = SameInitOptions(method=method)
        halves = [t.bfloat16() for t in tensors]
        b = base.bfloat16() if with_base else None
        exact = _merge(method, [t.double() for t in halves], b.double() if with_base else None, options, compat=True)
        ours = _merge(method, halves, b, options)
        assert ours.dtype == torch.bfloat16
        # one rounding to bfloat16: half an ulp of each value, at most 2^-9 of the largest
        assert float((ours.double() - exact).abs().max()) <= 2**-8 * float(exact.abs().max()), method


def test_parallel_opposite_and_zero_inputs_as_mergekit_handles_them():
    x = torch.randn(40, 30, generator=torch.Generator().manual_seed(0))
    # Model Stock: identical task vectors (cos 1) give the fine-tune, orthogonal ones (cos 0) the base
    base = torch.zeros_like(x)
    ms = SameInitOptions(method="model_stock")
    assert torch.allclose(_merge("model_stock", [x, x.clone()], base, ms), x, atol=1e-6)
    y = torch.zeros_like(x)
    y[0, 0] = 1.0
    orthogonal = x.clone()
    orthogonal[0, 0] = 0.0
    assert torch.equal(_merge("model_stock", [orthogonal, y], base, ms), base)
    # NuSLERP of parallel tensors: the line between them
    nu = SameInitOptions(method="nuslerp", weights=(1.0, 3.0))
    assert torch.allclose(_merge("nuslerp", [x, 2 * x], None, nu), 0.25 * x + 0.75 * 2 * x, atol=1e-6)
    # Multi-SLERP of opposite tensors whose weights balance: the line for two, refused for three
    ml = SameInitOptions(method="multislerp")
    assert torch.allclose(_merge("multislerp", [x, -x], None, ml), torch.zeros_like(x), atol=1e-6)
    with pytest.raises(InvalidArgumentError, match="mean direction is zero"):
        _merge("multislerp", [x, -x, torch.zeros_like(x)], None, SameInitOptions(method="multislerp",
                                                                                 weights=(1.0, 1.0, 0.0)))
    # Karcher: a zero tensor is left out of the direction but counts in the mean norm
    ka = SameInitOptions(method="karcher")
    merged = _merge("karcher", [x, torch.zeros_like(x)], None, ka)
    assert torch.allclose(merged, x / 2, atol=1e-6)
    assert torch.equal(_merge("karcher", [torch.zeros_like(x)] * 2, None, ka), torch.zeros_like(x))
