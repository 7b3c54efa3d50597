"""Models from checkpoint files: the architecture from a Python factory, the weights from the files."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..checks import layout_difference, tied_names
from ..errors import CheckpointError, ShapeMismatchError
from ..stages import timed
from .reader import Checkpoint
@timed("load")
def load_models(paths: Sequence[str], build_model: Callable[[], nn.Module], device: torch.device) -> list[nn.Module]:
    """Builds one model per checkpoint and loads its weights (every tensor of the model must be in
    the file, with its shape); eval mode, on `device`."""
    models = []
    for path in paths:
        ckpt = Checkpoint(path)
        model = build_model()
        expected = _untied(model, set(ckpt.keys()))
        missing, unexpected, differ = layout_difference({n: tuple(t.shape) for n, t in expected.items()},
                                                        {n: tuple(ckpt.shape(n)) for n in ckpt.keys()})
        if missing or unexpected:
            raise CheckpointError(f"{path} does not fit the architecture build_model makes: missing {len(missing)} "
                                  f"{missing[:3]}, unexpected {len(unexpected)} {unexpected[:3]}; check build_model and "
                                  "model_kwargs")
        if differ:
            name = differ[0]
            raise ShapeMismatchError(f"{path}: tensor {name!r} has shape {tuple(ckpt.shape(name))}, the architecture "
                                     f"build_model makes {tuple(expected[name].shape)}; check model_kwargs")
        model.load_state_dict({name: ckpt[name] for name in expected}, strict=len(expected) == len(model.state_dict()))
        models.append(model.to(device).eval())
    return models


def _untied(model: nn.Module, present: set[str]) -> dict[str, torch.Tensor]:
    """The model's state without the later names of tied tensors that the file leaves out (a tied
    LM head: save_pretrained writes the embedding only); loading the first name sets both."""
    state = model.state_dict(keep_vars=True)
    skipped = {n for names in tied_names(state) for n in names[1:] if n not in present}
    return {name: t.detach() for name, t in state.items() if name not in skipped}
