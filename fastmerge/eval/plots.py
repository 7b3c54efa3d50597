"""Figures as PNG files (matplotlib, headless): interpolation curves, per-layer alignment
diagnostics, NP Merge coefficient histograms, the loss plane, and feature-picture grids.

Every function writes its file atomically (temporary name, then rename) and returns the path.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import torch

from ..errors import ExtensionError, InvalidArgumentError
from ..io.atomic import atomic_path


def _pyplot():
    try:
        import matplotlib  # optional dependency (the demo extra): only figures need it
    except ImportError:
        raise ExtensionError("the figures need matplotlib: pip install matplotlib (or fastmerge[demo])") from None

    matplotlib.use("Agg", force=True)  # no display on servers and CI
    import matplotlib.pyplot as plt  # after use("Agg"): the backend must be chosen first

    return plt


def _save(fig, path: str | os.PathLike) -> str:
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    finally:
        _pyplot().close(fig)
    return os.fspath(path)


def plot_interpolation(curves: Mapping[str, object], path: str | os.PathLike, *, title: str = "") -> str:
    """Loss and accuracy along the path from model A (t = 0) to model B (t = 1), one line per
    alignment (Curve objects by label), the barrier in the legend."""
    if not curves:
        raise InvalidArgumentError("plot_interpolation needs at least one curve")
    plt = _pyplot()
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, c in curves.items():
        line, = ax_l.plot(c.ts, c.loss, marker="o", ms=3, label=f"{label} (barrier {c.loss_barrier():.3f})")
        ax_a.plot(c.ts, c.accuracy, marker="o", ms=3, color=line.get_color(),
                  label=f"{label} ({c.accuracy_barrier():.1f} pts)")
        if c.parents is not None:  # a dense alignment: theta(1) is not B itself; mark B's own values
            ax_l.plot([1.0], [c.parents[1][0]], "x", ms=8, color=line.get_color())
            ax_a.plot([1.0], [c.parents[1][1]], "x", ms=8, color=line.get_color())
    ax_l.set(xlabel="t (model A -> model B)", ylabel="test loss",
             title="loss (x: model B itself, where the aligned endpoint differs)")
    ax_a.set(xlabel="t (model A -> model B)", ylabel="test accuracy (%)", title="accuracy")
    for ax in (ax_l, ax_a):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_alignment(alignments: Mapping[str, object], path: str | os.PathLike) -> str:
    """Per layer: the mean correlation of matched units (each alignment with activation
    statistics), and the canonical correlation spectrum of every group CCA aligned."""
    plt = _pyplot()
    fig, (ax_m, ax_c) = plt.subplots(1, 2, figsize=(11, 3.8))
    any_cca = False
    for label, alignment in alignments.items():
        groups = [g for g, d in alignment.diagnostics.items() if isinstance(d, dict) and "matched_correlation" in d]
        if groups:
            values = [sum(alignment.diagnostics[g]["matched_correlation"].values())
                      / len(alignment.diagnostics[g]["matched_correlation"]) for g in groups]
            ax_m.plot(range(len(groups)), values, marker="o", label=label)
            ax_m.set_xticks(range(len(groups)), [g.split(".")[-1] if len(g) > 14 else g for g in groups],
                            rotation=45, fontsize=7)
        for g, d in alignment.diagnostics.items():
            if isinstance(d, dict) and "canonical_correlations" in d:
                for i, r in d["canonical_correlations"].items():
                    r = torch.as_tensor(r).double().cpu()
                    ax_c.plot(range(1, len(r) + 1), r.tolist(), label=f"{label} {g} (model {i})")
                    any_cca = True
    ax_m.set(ylabel="mean matched correlation", title="units matched by activation", ylim=(0, 1.02))
    ax_c.set(xlabel="canonical direction", ylabel="canonical correlation", title="CCA spectrum per layer",
             ylim=(0, 1.02))
    ax_m.grid(alpha=0.3)
    ax_c.grid(alpha=0.3)
    if alignments:
        ax_m.legend(fontsize=8)
    if any_cca:
        ax_c.legend(fontsize=7)
    else:
        ax_c.text(0.5, 0.5, "no CCA alignment", ha="center", va="center", transform=ax_c.transAxes)
    return _save(fig, path)


def plot_np_coefficients(coefficients: Mapping[str, torch.Tensor], path: str | os.PathLike, *,
                         model: int = 0, max_layers: int = 12) -> str:
    """Histograms of NP Merge's learned coefficient of parent `model`, one panel per tensor
    (NPMergeResult.coefficients: {name: (num_models, *shape)})."""
    names = [k for k in coefficients][:max_layers]
    if not names:
        raise InvalidArgumentError("plot_np_coefficients: no coefficients")
    plt = _pyplot()
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.5 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        values = coefficients[name][model].detach().double().reshape(-1).cpu()
        ax.hist(values.numpy(), bins=40, range=(0, 1), color="tab:blue")
        ax.axvline(float(values.mean()), color="tab:red", lw=1)
        ax.set_title(f"{name}\nmean {float(values.mean()):.2f}", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"NP Merge: coefficient of parent {model} per entry (0.5 = uniform)")
    fig.tight_layout()
    return _save(fig, path)


def plot_loss_plane(plane, path: str | os.PathLike, *, labels: Sequence[str] = ("model 0", "model 1", "model 2"),
                    title: str = "") -> str:
    """Test loss over the plane through three models (fastmerge.eval.loss_plane)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.6))
    loss = torch.tensor(plane.loss).clamp_max(torch.tensor(plane.loss).median() * 4)  # keep the basins visible
    levels = 24
    cs = ax.contourf(plane.u, plane.v, loss.log().numpy(), levels=levels, cmap="viridis")
    fig.colorbar(cs, ax=ax, label="log test loss")
    for (u, v), label in zip(plane.points, labels):
        ax.plot(u, v, "o", color="white", mec="black")
        right = u > (min(plane.u) + max(plane.u)) / 2  # labels point inwards, inside the axes
        ax.annotate(label, (u, v), textcoords="offset points", xytext=(-5 if right else 5, 5),
                    ha="right" if right else "left", color="white", fontsize=9)
    ax.set(xlabel="weight-space distance", ylabel="weight-space distance", title=title or "loss plane")
    ax.set_aspect("equal")
    return _save(fig, path)


def plot_feature_grid(pictures, path: str | os.PathLike) -> str:
    """The grid of fastmerge.eval.features.feature_pictures: per matched unit (row), the
    top-activating inputs and the activation-maximising input of each model, side by side."""
    plt = _pyplot()
    labels = list(pictures.models)
    k = pictures.top_k
    cols = len(labels) * (k + 1)
    rows = len(pictures.units)
    fig, axes = plt.subplots(rows, cols, figsize=(0.9 * cols, 1.0 * rows + 0.6), squeeze=False)
    for r, unit in enumerate(pictures.units):
        for m, label in enumerate(labels):
            images = list(pictures.top[label][r]) + [pictures.maximising[label][r]]
            for j, image in enumerate(images):
                ax = axes[r, m * (k + 1) + j]
                ax.imshow(_as_image(image), cmap="gray" if image.shape[0] == 1 else None)
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"{label}\n{'max act.' if j == k else f'top {j + 1}'}", fontsize=6)
        axes[r, 0].set_ylabel(unit, fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle("matched units: top-activating real inputs and activation maximisation", fontsize=9)
    return _save(fig, path)


def _as_image(x: torch.Tensor):
    """(C, H, W) -> an array imshow shows (grayscale or RGB), scaled to [0, 1] per picture."""
    x = x.detach().double().cpu()
    x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)
    return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()
