"""The benchmark report: merge quality over methods x number of models x seed sets (MLPs on digits
and MNIST-5k; BatchNorm CNNs on MNIST-5k: VGG-BN, ResNet-20 x1 and x4), speed of each op and
pipeline against its baseline, written into benchmarks/RESULTS.md (between markers, the
hand-written rest kept) with PNG charts next to it.

`fastmerge bench --report` runs it; `--quick` is the smoke version (digits, small sizes) CI runs.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import platform
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..alignment import METHODS as ALIGNMENT_METHODS
from ..demo import METHOD_ROWS, NP_MERGE_ALIGNMENTS, describe, run_demo
from ..eval.plots import _pyplot, _save
from ..errors import InvalidArgumentError
from ..io.atomic import write_text_atomic
from . import run, standard
from .merge_workloads import cca_all_groups, stats_overhead

BEGIN = "<!-- fastmerge bench --report: begin (generated, replaced on every run) -->"
END = "<!-- fastmerge bench --report: end -->"
# every registered alignment method, between the direct average and NP Merge
QUALITY_METHODS = ("average", *ALIGNMENT_METHODS, "np_merge:permute")
NAMES = {"average": "direct average", **{name: m.label for name, m in ALIGNMENT_METHODS.items()},
         **{f"np_merge:{a}": f"NP Merge after {ALIGNMENT_METHODS[a].label}" for a in NP_MERGE_ALIGNMENTS}}


@dataclass(frozen=True)
class Setting:
    """One quality table: models of `arch` (width `hidden`, see fastmerge.demo.describe) on `dataset`;
    2-model merges of every pair or of disjoint pairs (fastmerge.demo.run_demo's pairing); `methods`:
    its rows (None: run_quality's `methods`)."""

    dataset: str
    arch: str = "mlp"
    hidden: int = 32
    pairing: str = "all"
    methods: tuple | None = None

    @property
    def label(self) -> str:
        return f"{self.dataset}: {describe(self.arch, self.hidden)}"


MLP_SETTINGS = (Setting("digits", "mlp", 32), Setting("mnist5k", "mlp", 512))
# CNN merges take seconds each: disjoint pairs; NP Merge after both permute and CCA, but not on
# ResNet-20 x4 (8x the compute of x1: training its models takes 10 minutes each on 2 cores, its
# table an hour more; "wide" runs it alone)
CNN_SETTINGS = (Setting("mnist5k", "vgg_bn", 32, "disjoint", METHOD_ROWS),
                Setting("mnist5k", "resnet20", 16, "disjoint", METHOD_ROWS))
WIDE_SETTINGS = (Setting("mnist5k", "resnet20", 64, "disjoint", ("average", *ALIGNMENT_METHODS)),)
SETTINGS = {"all": MLP_SETTINGS + CNN_SETTINGS + WIDE_SETTINGS, "mlp": MLP_SETTINGS, "cnn": CNN_SETTINGS,
            "wide": WIDE_SETTINGS}


@dataclass
class QualityResult:
    """Test accuracy (%) per setting (its label), method and number of merged models: one value per
    seed set; `repaired` the same after REPAIR."""

    seed_sets: int
    seeds_per_set: int
    values: dict = field(default_factory=dict)     # (label, method, models) -> [per seed set]
    repaired: dict = field(default_factory=dict)   # (label, method, models) -> [per seed set]
    parents: dict = field(default_factory=dict)    # label -> [per seed set]
    ensembles: dict = field(default_factory=dict)  # (label, models) -> [per seed set]
    settings: dict = field(default_factory=dict)   # label -> Setting


@dataclass
class SpeedResult:
    rows: list = field(default_factory=list)  # (name, group, ratio, kind, target, met)


def _mean_spread(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_quality(settings: Sequence[Setting] = MLP_SETTINGS + CNN_SETTINGS, *, seed_sets: int = 3,
                seeds_per_set: int = 4, methods: Sequence[str] = QUALITY_METHODS, epochs: int | None = None,
                progress: bool = True) -> QualityResult:
    """fastmerge.demo's merges for each set of seeds (set k: seeds k*seeds_per_set ...); within a set
    the 2-model number is the mean over all pairs, the 4-model number merges the first four.
    BatchNorm CNNs are merged with a BatchNorm reset (their first column), MLPs without."""
    result = QualityResult(seed_sets, seeds_per_set)
    for setting in settings:
        label = setting.label
        result.settings[label] = setting
        for k in range(seed_sets):
            demo = run_demo(setting.dataset, arch=setting.arch, hidden=setting.hidden, seeds=seeds_per_set,
                            methods=methods if setting.methods is None else setting.methods,
                            epochs=epochs, progress=progress, first_seed=k * seeds_per_set, pairing=setting.pairing)
            result.parents.setdefault(label, []).append(statistics.fmean(demo.parents))
            result.ensembles.setdefault((label, 2), []).append(statistics.fmean(demo.ensemble2))
            if demo.ensemble4 is not None:
                result.ensembles.setdefault((label, 4), []).append(demo.ensemble4)
            for (method, n, repaired), accs in demo.rows.items():
                into = result.repaired if repaired else result.values
                into.setdefault((label, method, n), []).append(statistics.fmean(accs))
    return result


def _untargeted(workload):
    """Pipeline targets are set for the full sizes; at smoke sizes fixed costs dominate: report only."""
    workload.target = None
    return workload


def run_speed(quick: bool = False, repeats: int = 3, progress=None) -> SpeedResult:
    """Every op workload of `fastmerge bench` plus the pipeline workloads, best of `repeats`."""
    pipeline = ([lambda: _untargeted(stats_overhead(width=1, image=16, batch=8, batches=1)),
                 lambda: _untargeted(cca_all_groups((64, 64, 128)))]
                if quick else [lambda: stats_overhead(), lambda: cca_all_groups()])
    speed = SpeedResult()
    for r in run(standard(quick=quick) + pipeline, repeats=repeats, progress=progress):
        w = r.workload
        speed.rows.append((w.name, w.group, r.ratio, w.ratio_kind, w.target, w.met(r.ratio)))
    return speed


def quality_tables(q: QualityResult) -> list[str]:
    def cell(values):
        if not values:
            return "-"
        mean, spread = _mean_spread(values)
        return f"{mean:.1f} ± {spread:.1f}" if len(values) > 1 else f"{mean:.1f}"  # one seed set: no spread

    lines = []
    for label, setting in q.settings.items():
        bn = setting.arch in ("vgg_bn", "resnet20")
        first = " (BN reset)" if bn else ""
        lines += ["", f"### {label}, test accuracy % (mean ± spread over {q.seed_sets} seed set(s) of "
                      f"{q.seeds_per_set} models)", "",
                  f"| method | 2 models{first} | 2 models + REPAIR | 4 models{first} | 4 models + REPAIR |",
                  "|---|---|---|---|---|"]
        lines.append(f"| parents (mean) / ensemble | {cell(q.parents.get(label))} / "
                     f"{cell(q.ensembles.get((label, 2)))} | | {cell(q.ensembles.get((label, 4)))} (ensemble) | |")
        for method in NAMES:
            if any(key[:2] == (label, method) for key in q.values):
                cells = [cell(source.get((label, method, n))) for n in (2, 4) for source in (q.values, q.repaired)]
                lines.append(f"| {NAMES[method]} | " + " | ".join(cells) + " |")
    return lines


def speed_table(s: SpeedResult) -> list[str]:
    lines = ["", "| workload | ratio vs its baseline | target |", "|---|---|---|"]
    for name, _, ratio, kind, target, met in s.rows:
        what = {"bandwidth": "of the baseline's bandwidth", "overhead": "of the baseline's time"}.get(kind, "faster")
        goal = "report" if target is None else (f"{'<=' if kind == 'overhead' else '>='} {target}"
                                                f" ({'met' if met else 'MISSED'})")
        lines.append(f"| {name} | {ratio:.2f}x {what} | {goal} |")
    return lines


def plot_quality(q: QualityResult, path: str) -> str:
    plt = _pyplot()
    datasets = list(q.settings)
    columns = min(3, len(datasets))
    rows = -(-len(datasets) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.5 * columns, 4 * rows), squeeze=False)
    for ax in axes.flat[len(datasets):]:
        ax.axis("off")
    for ax, dataset in zip(axes.flat, datasets):
        methods = [m for m in NAMES if any(key[:2] == (dataset, m) for key in q.values)]
        for j, n in enumerate((2, 4)):
            stats = [_mean_spread(q.values[(dataset, m, n)]) if (dataset, m, n) in q.values else (0.0, 0.0)
                     for m in methods]
            xs = [i + (j - 0.5) * 0.38 for i in range(len(methods))]
            ax.bar(xs, [s[0] for s in stats], width=0.38, yerr=[s[1] for s in stats], capsize=3, label=f"{n} models")
        if dataset in q.parents:
            ax.axhline(statistics.fmean(q.parents[dataset]), color="black", ls="--", lw=1, label="parents (mean)")
        if (dataset, 2) in q.ensembles:
            ax.axhline(statistics.fmean(q.ensembles[(dataset, 2)]), color="gray", ls=":", lw=1, label="ensemble of 2")
        ax.set_xticks(range(len(methods)), [NAMES[m] for m in methods], rotation=25, ha="right", fontsize=8)
        ax.set(ylabel="test accuracy (%)", title=dataset, ylim=(0, 100))
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_speed(s: SpeedResult, path: str) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(s.rows) + 1.2))
    names = [r[0] for r in s.rows][::-1]
    ratios = [r[2] for r in s.rows][::-1]
    colors = ["tab:green" if r[5] in (True, None) else "tab:red" for r in s.rows][::-1]
    ax.barh(range(len(names)), ratios, color=colors)
    for i, r in enumerate(s.rows[::-1]):
        if r[4] is not None:
            ax.plot([r[4]], [i], "k|", ms=14)
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set(xlabel="ratio vs baseline (log; | = target; bandwidth and overhead ratios as in the table)",
           title="fastmerge vs baselines (red: target missed)")
    return _save(fig, path)


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}")


def render(quality: QualityResult | None, speed: SpeedResult | None, figures: dict, command: str) -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [BEGIN, "# Generated report", "", f"Command: `{command}`; {stamp}; {machine()}."]
    if quality is not None:
        lines += ["", "## Merge quality"] + quality_tables(quality)
        if "quality" in figures:
            lines += ["", f"![merge quality]({os.path.basename(figures['quality'])})"]
    if speed is not None:
        lines += ["", "## Speed"] + speed_table(speed)
        if "speed" in figures:
            lines += ["", f"![speed ratios]({os.path.basename(figures['speed'])})"]
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_report(path: str, block: str) -> str:
    """Replaces the generated block of `path` (or appends it), atomically; the rest stays."""
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block
    return write_text_atomic(path, text)


def run_report(path: str = "benchmarks/RESULTS.md", *, quick: bool = False, quality: bool = True, speed: bool = True,
               repeats: int = 3, seed_sets: int | None = None, progress=None, settings: str = "all") -> str:
    """Runs what is asked and writes the report block and the charts (next to `path`); `settings`:
    the quality tables, "all", "mlp" or "cnn" (SETTINGS)."""
    if settings not in SETTINGS:
        raise InvalidArgumentError(f"settings must be one of {sorted(SETTINGS)}, got {settings!r}")
    tables = MLP_SETTINGS[:1] if quick or not importlib.util.find_spec("mlxtend") else SETTINGS[settings]
    q = (run_quality(tables, seed_sets=seed_sets or (1 if quick else 3), seeds_per_set=2 if quick else 4,
                     methods=("average", "permute", "cca") if quick else QUALITY_METHODS,
                     epochs=10 if quick else None, progress=progress is not None) if quality else None)
    s = run_speed(quick=quick, repeats=repeats, progress=progress) if speed else None
    folder = os.path.dirname(os.path.abspath(path))
    figures = {}
    if q is not None:
        figures["quality"] = plot_quality(q, os.path.join(folder, "quality.png"))
    if s is not None:
        figures["speed"] = plot_speed(s, os.path.join(folder, "speed.png"))
    command = ("fastmerge bench --report" + (" --quick" if quick else "")
               + (f" --settings {settings}" if settings != "all" else "") + ("" if speed else " --no-speed"))
    return write_report(path, render(q, s, figures, command))
