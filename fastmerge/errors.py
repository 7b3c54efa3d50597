"""Typed exceptions of fastmerge. Every message names the tensor/file, the shapes and the fix.

All derive from :class:`FastmergeError`; each also derives from the built-in exception a caller
would expect (``ValueError`` for bad values, ``RuntimeError`` for a missing engine), so code that
catches those keeps working.
"""


class FastmergeError(Exception):
    """Base class of every error fastmerge raises on purpose."""


class InvalidArgumentError(FastmergeError, ValueError):
    """An option or argument outside what the function accepts (unknown name, bad value)."""


class IndexOutOfRangeError(FastmergeError, IndexError):
    """An index (tensor, axis, block, permutation entry) outside the valid range."""


class ShapeMismatchError(FastmergeError, ValueError):
    """Tensors that must agree in shape, dtype or count do not."""


class NonFiniteError(FastmergeError, ValueError):
    """NaN or Inf where fastmerge needs finite numbers (weights, activations, costs)."""


class ExtensionError(FastmergeError, RuntimeError):
    """The compiled engine is required but could not be loaded."""


class SpecError(InvalidArgumentError):
    """A merge spec that does not fit its model (unknown tensors, wrong sizes, bad YAML), or that
    fails the function-preservation check."""


class DataError(InvalidArgumentError):
    """Data that cannot give what was asked of it: no batches, too few samples for the statistics."""


class CheckpointError(FastmergeError, ValueError):
    """A checkpoint file that cannot be read or written as asked (missing, corrupt, unsafe, would
    overwrite an input)."""
