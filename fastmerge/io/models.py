"""Models from checkpoint files: the architecture from a Python factory, the weights from the files."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..errors import CheckpointError, ShapeMismatchError
from .reader import Checkpoint


def load_models(paths: Sequence[str], build: Callable[[], nn.Module], device: torch.device) -> list[nn.Module]:
    """Builds one model per checkpoint and loads its weights (every tensor of the model must be in
    the file, with its shape); eval mode, on `device`."""
    models = []
    for path in paths:
        ckpt = Checkpoint(path)
        model = build()
        expected = model.state_dict()
        missing = sorted(set(expected) - set(ckpt.keys()))
        unexpected = sorted(set(ckpt.keys()) - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"{path} does not fit the architecture build_model makes: missing {len(missing)} "
                                  f"{missing[:3]}, unexpected {len(unexpected)} {unexpected[:3]}; check build_model and "
                                  "model_kwargs")
        for name, tensor in expected.items():
            if tuple(ckpt.shape(name)) != tuple(tensor.shape):
                raise ShapeMismatchError(f"{path}: tensor {name!r} has shape {tuple(ckpt.shape(name))}, the "
                                         f"architecture build_model makes {tuple(tensor.shape)}; check model_kwargs")
        model.load_state_dict({name: ckpt[name] for name in expected})
        models.append(model.to(device).eval())
    return models
