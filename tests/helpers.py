"""Small shared helpers of the test suite."""

import torch


def rel_fro(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative Frobenius error ||a - e|| / ||e|| in float64 (0 when both are zero)."""
    a, e = actual.double(), expected.double()
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff if denom == 0 else diff / denom
