import pytest

from fastmerge import _ext


@pytest.fixture(scope="session", autouse=True)
def compiled_engine():
    assert _ext.load(), f"benchmarks time the compiled engine, which is not loaded: {_ext.unavailable_reason()}"
