import pytest
import torch

from fastmerge import _ext


@pytest.fixture(scope="session", autouse=True)
def compiled_engine():
    """The suite tests the compiled ops; without them it would only test the references."""
    assert _ext.load(), f"the compiled fastmerge library is not loaded: {_ext.unavailable_reason()}"


@pytest.fixture
def gen():
    """A seeded generator per test, so every failure reproduces."""
    return torch.Generator().manual_seed(1234)

