"""`fastmerge eval`'s job: merge parents with several alignments and judge every result by the
numbers (parents, ensemble, merges; barriers of the aligned paths) and by figures.

Two sources of models: the built-in default (MLPs and small CNNs trained from different seeds on
real data, digits or MNIST-5k; cached like the demo's) or checkpoint files with a model factory and
data (as `fastmerge merge --model ... --data ...`). Results go to one folder: metrics.json and PNGs.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..alignment import align as align_models
from ..datasets import load_dataset
from ..io.atomic import write_text_atomic
from ..merging import merge
from ..merging.np_merge import np_merge
from ..spec import trace_spec
from ..zoo.training import TrainConfig, cnn_config, model_inputs, trained_model
from . import plots
from .features import feature_pictures
from .interpolation import interpolate, loss_plane
from .metrics import ensemble, evaluate

DIRECT = "direct (no alignment)"


@dataclass
class EvalReport:
    folder: str
    metrics: dict = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)

    def table(self) -> str:
        m = self.metrics
        lines = [f"{m.get('title', 'evaluation')}: test accuracy % / loss; barrier of the path A -> B (loss, accuracy pts)",
                 "| model | accuracy | loss | loss barrier | accuracy barrier |", "|---|---|---|---|---|"]
        for i, p in enumerate(m["parents"]):
            lines.append(f"| parent {i} | {p['accuracy']:.1f} | {p['loss']:.3f} | | |")
        lines.append(f"| ensemble of {len(m['parents'])} | {m['ensemble']['accuracy']:.1f} | {m['ensemble']['loss']:.3f} | | |")
        for name, r in m["merges"].items():
            curve = m["curves"].get(name)
            barriers = (f"{curve['loss_barrier']:.3f} | {curve['accuracy_barrier']:.1f}" if curve else " | ")
            lines.append(f"| merge: {name} | {r['accuracy']:.1f} | {r['loss']:.3f} | {barriers} |")
        return "\n".join(lines)


def _aligned_copy(model: nn.Module, alignment, index: int) -> nn.Module:
    out = copy.deepcopy(model)
    out.load_state_dict(alignment.apply(index, model.state_dict()))
    return out.eval()


def evaluate_merges(models: Sequence[nn.Module], fit: Sequence, test: Sequence, folder: str, *,
                    methods: Sequence[str] = ("permute", "weight_matching", "cca"), steps: int = 11,
                    np_steps: int = 100, plane_grid: int = 11, title: str = "") -> EvalReport:
    """Numbers and figures for two or three parents.

    Args:
        models: the parents (one architecture); the first two give the interpolation paths, a third
            adds the loss plane (through the three after permutation alignment).
        fit: labelled training batches (statistics, BatchNorm resets, NP Merge).
        test: labelled held-out batches: every reported number is measured on them.
    """
    os.makedirs(folder, exist_ok=True)
    report = EvalReport(folder)
    inputs = [x for x, _ in fit]
    spec = trace_spec(models[0], (inputs[0][:2],))
    a, b = models[0], models[1]
    metrics: dict = {"title": title, "parents": [evaluate(m, test).as_dict() for m in models],
                     "ensemble": ensemble(models, test).as_dict(), "merges": {}, "curves": {}}
    curves = {DIRECT: interpolate(a, b, test, steps=steps, reset_data=inputs)}
    metrics["merges"][DIRECT] = evaluate(merge([a, b], "average", data=inputs, progress=False), test).as_dict()
    alignments = {}
    for method in methods:
        alignment = align_models([a, b], method, spec=spec, data=inputs, progress=False)
        alignments[method] = alignment
        dense = any(not isinstance(t, torch.Tensor) for t in alignment.transforms[1].values())
        # both ends as the alignment has them (a BatchNorm network's reference comes folded and back,
        # its channels' scales in the weights, as the merge combines them)
        curves[method] = interpolate(_aligned_copy(a, alignment, 0), _aligned_copy(b, alignment, 1), test,
                                     steps=steps, reset_data=inputs, parents=(a, b) if dense else None)
        merged = merge([a, b], method, alignment=alignment, data=inputs, progress=False)
        metrics["merges"][method] = evaluate(merged, test).as_dict()
    if "permute" in alignments:  # NP Merge on top of the permutation: where does each parent win?
        parents = [_aligned_copy(m, alignments["permute"], i) for i, m in enumerate((a, b))]
        result = np_merge(parents, fit, steps=np_steps, lr=3e-2, progress=False)
        metrics["merges"]["NP Merge after permute"] = evaluate(result.model, test).as_dict()
        report.figures.append(plots.plot_np_coefficients(result.coefficients, os.path.join(folder, "np_coefficients.png")))
    metrics["curves"] = {name: c.as_dict() for name, c in curves.items()}
    report.figures.append(plots.plot_interpolation(curves, os.path.join(folder, "interpolation.png"), title=title))
    report.figures.append(plots.plot_alignment({m: al for m, al in alignments.items() if m != "weight_matching"},
                                               os.path.join(folder, "alignment.png")))
    if len(models) >= 3 and plane_grid > 1:
        everyone = align_models(list(models[:3]), "permute", spec=spec, data=inputs, progress=False)
        aligned = [_aligned_copy(models[i], everyone, i) for i in range(3)]
        plane = loss_plane(aligned, test, grid=plane_grid, reset_data=inputs)
        metrics["plane"] = plane.as_dict()
        report.figures.append(plots.plot_loss_plane(plane, os.path.join(folder, "loss_plane.png"),
                                                    labels=("A", "B (permuted)", "C (permuted)"),
                                                    title="test loss, plane through 3 aligned models"))
    report.metrics = metrics
    return report


def feature_report(models: Sequence[nn.Module], fit_inputs: Sequence[torch.Tensor], test_inputs: torch.Tensor,
                   layer: str, folder: str, *, steps: int = 150, num_units: int = 6) -> tuple[str, dict]:
    """Feature pictures of a CNN pair aligned by permutation and their average: matched units of
    A, B (permuted onto A) and the merge, side by side. Returns the PNG path and the numbers."""
    spec = trace_spec(models[0], (fit_inputs[0][:2],))
    alignment = align_models(list(models[:2]), "permute", spec=spec, data=list(fit_inputs), progress=False)
    merged = merge(list(models[:2]), "permute", alignment=alignment, data=list(fit_inputs), progress=False)
    aligned_b = _aligned_copy(models[1], alignment, 1)
    pictures = feature_pictures({"A": models[0], "B (permuted)": aligned_b, "merged": merged}, layer, test_inputs,
                                num_units=num_units, steps=steps)
    path = plots.plot_feature_grid(pictures, os.path.join(folder, "features.png"))
    return path, {"layer": layer, "units": pictures.unit_index, "matched_correlation": pictures.correlations}


def write_json(metrics: dict, path: str) -> None:
    write_text_atomic(path, json.dumps(metrics, indent=1))


def builtin(dataset: str = "digits", folder: str = "eval", *, quick: bool = False,
            methods: Sequence[str] = ("permute", "weight_matching", "cca")) -> EvalReport:
    """The default job: three MLPs and two CNNs trained from different seeds on `dataset`."""
    split = load_dataset(dataset)
    hidden = 32 if dataset == "digits" else 128
    epochs = (15 if quick else 60) if dataset == "digits" else (5 if quick else 20)
    mlp_config = TrainConfig(dataset=dataset, hidden=hidden, epochs=epochs)
    mlps = [trained_model(mlp_config, split, s) for s in range(3)]

    def labelled(config, x, y, size=256):
        x = model_inputs(config, x)
        return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]

    fit, test = labelled(mlp_config, split.x_fit, split.y_fit), labelled(mlp_config, split.x_test, split.y_test)
    report = evaluate_merges(mlps, fit, test, folder, methods=methods, steps=6 if quick else 11, np_steps=30 if quick else 150,
                             plane_grid=5 if quick else 13,
                             title=f"{dataset}: MLP {hidden}-{hidden}, 3 seeds")
    if dataset == "digits":  # 8x8: a VGG without BatchNorm; layer: its second conv
        config, layer = TrainConfig(dataset=dataset, hidden=32, epochs=8 if quick else 30, arch="vgg"), "features.2"
    else:  # 28x28 MNIST: the VGG with BatchNorm of the demo's CNN section; layer: its second conv's ReLU
        config, layer = cnn_config(dataset, "vgg_bn", 32, 3 if quick else 8), "features.5"
    cnns = [trained_model(config, split, s) for s in range(2)]
    cnn_fit = [x for x, _ in labelled(config, split.x_fit, split.y_fit)][:8]
    path, numbers = feature_report(cnns, cnn_fit, model_inputs(config, split.x_test), layer, folder,
                                   steps=60 if quick else 200, num_units=4 if quick else 6)
    report.figures.append(path)
    report.metrics["features"] = numbers
    write_json(report.metrics, os.path.join(folder, "metrics.json"))
    return report
