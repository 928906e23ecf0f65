"""Figures every model shares: where a figure is written, the loss curves, covariance ellipses
and exact against approximate Gaussian posteriors (drawn for any model with an exact posterior).
Each model's own figures are in :mod:`zoo.figures`. Each function draws on a fresh
``matplotlib.figure.Figure`` (no pyplot, so no global state and no display needed), saves it to
``path`` and returns the path."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.backend_bases import FigureCanvasBase
from matplotlib.figure import Figure
from matplotlib.patches import Ellipse

from zoo.errors import ZooError


def figure_path(path: str | os.PathLike) -> Path:
    """The file a figure for ``path`` is written to: ``path`` itself when it names an image
    format matplotlib writes, ``path`` with ``.png`` added when it has no suffix; any other
    suffix is an error."""
    path = Path(path)
    if not path.suffix:
        return path.with_name(path.name + ".png")
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        raise ZooError(f"cannot draw a figure into {path.name}: choose a name ending in one of "
                       f"{', '.join('.' + name for name in sorted(formats))}")
    return path


def save_figure(figure: Figure, path: str | os.PathLike) -> Path:
    """Write ``figure`` to ``path`` (see :func:`figure_path`; creating its folder) and return
    the path written."""
    path = figure_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return path


MARKED_EPOCHS = 30
"""Loss curves of at most this many epochs mark each epoch."""


def plot_training(history: Sequence[dict[str, float]], path: str | Path, *,
                  reference: float | None = None, reference_label: str = "exact") -> Path:
    """Train and test loss (nats per data point) over epochs, with an optional horizontal
    reference line (for example the negative closed-form maximum log-likelihood).

    The x-axis counts epochs by steps, step / steps per epoch. A last epoch cut short by a
    number of steps (``--steps``) averages its train loss over those few steps only, so it is
    drawn as a hollow marker apart from the curve, not joined to it. Up to ``MARKED_EPOCHS``
    epochs, each epoch has a marker, so that a run of one epoch still shows its point."""
    figure = Figure(figsize=(6, 3.5))
    axes = figure.subplots()
    steps = [row["step"] for row in history]
    per_epoch = [after - before for before, after in zip([0, *steps[:-1]], steps, strict=True)]
    full = max(per_epoch)
    epochs = [step / full for step in steps]
    train = [row["train_loss"] for row in history]
    partial = len(history) > 1 and per_epoch[-1] < full
    marker = "o" if len(history) <= MARKED_EPOCHS else None
    line = axes.plot(epochs[:-1] if partial else epochs, train[:-1] if partial else train,
                     marker=marker, markersize=3, label="train")[0]
    if partial:
        axes.plot(epochs[-1:], train[-1:], linestyle="none", marker="o", fillstyle="none",
                  color=line.get_color(),
                  label=f"train, last epoch ({per_epoch[-1]} of {full} steps)")
    test = [row["test_loss"] for row in history]
    if any(value is not None and not math.isnan(value) for value in test):
        axes.plot(epochs, test, marker=marker, markersize=3, label="test")
    if reference is not None:
        axes.axhline(reference, color="black", linestyle="--", linewidth=1, label=reference_label)
    axes.set_xlabel("epoch")
    axes.set_ylabel("loss (nats per data point)")
    axes.legend()
    axes.grid(alpha=0.3)
    return save_figure(figure, path)


def covariance_ellipse(mean: torch.Tensor, covariance: torch.Tensor, **style) -> Ellipse:
    """The 2-standard-deviation ellipse of a 2-D Gaussian."""
    variances, axes = torch.linalg.eigh(covariance)
    angle = math.degrees(math.atan2(axes[1, 1], axes[0, 1]))
    width, height = (4 * variances.clamp(min=0).sqrt()).tolist()[::-1]
    return Ellipse(mean.tolist(), width, height, angle=angle, fill=False, **style)


@torch.no_grad()
def plot_posterior_ellipses(posterior, approximation, path: str | Path, *,
                            title: str = "", dims: tuple[int, int] = (0, 1)) -> Path:
    """Exact posteriors p(z | x_n) (black) and approximations q(z | x_n) (red) of a few data
    points as 2-standard-deviation ellipses over two latent dimensions.

    ``posterior`` and ``approximation`` are Gaussian distributions with batch shape [n] and
    event shape [M] (``MultivariateNormal`` or a diagonal ``Independent(Normal)``).
    """
    figure = Figure(figsize=(4.5, 4.5))
    axes = figure.subplots()
    index = list(dims)
    for distribution, color, label in ((posterior, "black", "exact p(z|x)"),
                                       (approximation, "tab:red", "q(z|x)")):
        means = distribution.mean[:, index]
        covariances = _covariance(distribution)[:, index][:, :, index]
        for n, (mean, covariance) in enumerate(zip(means, covariances, strict=True)):
            axes.add_patch(covariance_ellipse(mean, covariance, color=color,
                                    label=label if n == 0 else None))
        axes.scatter(*means.T, color=color, s=8)
    axes.set_xlabel(f"z{dims[0] + 1}")
    axes.set_ylabel(f"z{dims[1] + 1}")
    axes.set_aspect("equal", adjustable="datalim")
    axes.autoscale_view()
    axes.legend(loc="best")
    axes.set_title(title)
    return save_figure(figure, path)


def _covariance(distribution) -> torch.Tensor:
    if hasattr(distribution, "covariance_matrix"):
        return distribution.covariance_matrix
    return torch.diag_embed(distribution.variance)
