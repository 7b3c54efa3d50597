"""What the command line's --model and --data name: Python objects by reference, or built-in data.

References `module:attribute` (or `path/to/file.py:attribute`) name Python objects: the attribute is
called without arguments when it is callable (keyword arguments for the model factory can be given
as JSON). Loading them runs that code, as any training script would; checkpoint files themselves
are never executed (safetensors, or torch files with weights_only=True).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable, Iterable

from torch import nn

from ..datasets import BUILTIN, split_batches
from ..errors import InvalidArgumentError


def resolve(reference: str, what: str):
    """The object `reference` ("package.module:attr" or "file.py:attr") names."""
    module_name, sep, attr = reference.rpartition(":")
    if not sep or not module_name or not attr:
        raise InvalidArgumentError(f"{what} {reference!r}: write it as module:attribute (e.g. mypkg.models:build) "
                                   "or path/to/file.py:attribute")
    try:
        if module_name.endswith(".py"):
            if not os.path.isfile(module_name):
                raise InvalidArgumentError(f"{what} {reference!r}: no file {module_name}")
            spec = importlib.util.spec_from_file_location(os.path.basename(module_name)[:-3], module_name)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidArgumentError(f"{what} {reference!r}: cannot import {module_name} ({exc})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise InvalidArgumentError(f"{what} {reference!r}: {module_name} has no attribute {attr!r}") from None


def model_factory(reference: str, kwargs: dict | None = None) -> Callable[[], nn.Module]:
    """A function building the model `reference` names, called with `kwargs` (--model-kwargs)."""
    target = resolve(reference, "--model")
    if not callable(target):
        raise InvalidArgumentError(f"--model {reference!r} is not callable; name a class or a function that builds "
                                   "the model")

    def build() -> nn.Module:
        try:
            model = target(**(kwargs or {}))
        except TypeError as exc:  # the arguments do not fit the factory's signature
            raise InvalidArgumentError(f"--model {reference!r} could not be called with --model-kwargs "
                                       f"{kwargs or {}} ({exc})") from None
        if not isinstance(model, nn.Module):
            raise InvalidArgumentError(f"--model {reference!r} returned {type(model).__name__}, not a torch.nn.Module")
        return model

    return build


def data_from(reference: str, batch_size: int = 256) -> Iterable:
    """Batches named by `reference`: a built-in dataset (fastmerge.datasets: "digits", "mnist5k"; the
    fit split, or the validation split with ":val"; batches of (inputs, labels)) or a module:attribute that is (or returns) an iterable of batches."""
    name, _, split = reference.partition(":")
    if name in BUILTIN and split in ("", "fit", "val"):
        return split_batches(name, split or "fit", batch_size)
    target = resolve(reference, "--data")
    batches = target() if callable(target) else target
    if not isinstance(batches, Iterable):
        raise InvalidArgumentError(f"--data {reference!r} gave {type(batches).__name__}, not an iterable of batches")
    return batches
