"""Figures of Gaussian mixtures. Like :mod:`zoo.plots`, each function draws on a fresh
``matplotlib.figure.Figure`` (no pyplot), saves it to ``path`` and returns the path; ``draw_*``
functions draw onto given axes, for figures with several panels.

Data with more than two columns are shown in the plane of their first two principal components:
with c the column means of the training rows and P: [D, 2] the two leading eigenvectors of
their covariance, a row x is drawn at P^T (x - c) and component k, as the Gaussian it projects
to, N(P^T (mu_k - c), P^T Sigma_k P) (the exact distribution of the projected points).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from zoo.contract import DISCRETE_POSTERIOR, offers
from zoo.entries.gmm_start import warn_if_floor_binds
from zoo.linalg import principal_axes
from zoo.plots import covariance_ellipse, save_figure


def component_colors(components: int) -> torch.Tensor:
    """One RGB colour per component, ``[K, 3]`` (tab10, or tab20 beyond 10 components)."""
    cmap = colormaps["tab10" if components <= 10 else "tab20"]
    return torch.tensor([cmap(k % cmap.N)[:3] for k in range(components)])


def principal_plane(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[str, str]]:
    """The centre ``c: [D]``, projection ``P: [D, 2]`` and axis labels of the plane a table is
    drawn in: its own two columns for D = 2, else its first two principal components (each
    direction signed so that its largest entry is positive)."""
    x = x.double()
    D = x.shape[1]
    if D == 2:
        return x.new_zeros(2), torch.eye(2, dtype=x.dtype), ("x1", "x2")
    c = x.mean(0)
    _, P = principal_axes(torch.cov(x.T), 2)
    return c, P, ("principal component 1", "principal component 2")


@torch.no_grad()
def draw_components(axes: Axes, x: torch.Tensor, responsibilities: torch.Tensor,
                    weights: torch.Tensor, means: torch.Tensor, covariances: torch.Tensor, *,
                    plane: tuple[torch.Tensor, torch.Tensor, tuple[str, str]] | None = None,
                    title: str = "", linestyle: str = "-") -> None:
    """Rows of ``x: [N, D]`` (D >= 2) coloured by their responsibilities ``[N, K]`` (each row
    the mixture of the component colours it gives), and each component's 2-standard-deviation
    ellipse with its weight, in ``plane`` (default: :func:`principal_plane` of ``x``)."""
    c, P, labels = plane if plane is not None else principal_plane(x)
    colors = component_colors(weights.shape[0])
    y = (x.double() - c) @ P
    point_colors = (responsibilities.double() @ colors.double()).clamp(0, 1)
    axes.scatter(*y.T.tolist(), c=point_colors.tolist(), s=6, alpha=0.6, linewidths=0)
    centres = (means.double() - c) @ P
    projected = P.T @ covariances.double() @ P
    for k, (centre, covariance) in enumerate(zip(centres, projected, strict=True)):
        axes.add_patch(covariance_ellipse(centre, covariance, color=tuple(colors[k].tolist()),
                                linewidth=2, linestyle=linestyle))
        axes.annotate(f"{weights[k]:.2f}", centre.tolist(), ha="center", va="center",
                      fontsize=8, fontweight="bold")
    axes.set_xlabel(labels[0])
    axes.set_ylabel(labels[1])
    axes.set_aspect("equal", adjustable="datalim")
    axes.autoscale_view()
    axes.set_title(title)


@torch.no_grad()
def draw_densities(axes: Axes, x: torch.Tensor, weights: torch.Tensor, means: torch.Tensor,
                   covariances: torch.Tensor, *, title: str = "") -> None:
    """One-column data: a histogram of ``x: [N, 1]`` with each weighted component density
    pi_k N(t | mu_k, sigma_k^2) and the mixture density, their sum."""
    values = x[:, 0].double()
    axes.hist(values.tolist(), bins=min(60, max(10, values.numel() // 20)), density=True,
              color="0.8")
    t = torch.linspace(float(values.min()), float(values.max()), 400, dtype=torch.float64)
    sd = covariances[:, 0, 0].double().sqrt()
    density = weights.double()[:, None] * torch.exp(
        -0.5 * ((t - means[:, 0].double()[:, None]) / sd[:, None]) ** 2
    ) / (sd[:, None] * math.sqrt(2 * math.pi))                                  # [K, T]
    for k, (row, color) in enumerate(zip(density, component_colors(weights.shape[0]),
                                         strict=True)):
        axes.plot(t.tolist(), row.tolist(), color=tuple(color.tolist()), label=f"component {k}")
    axes.plot(t.tolist(), density.sum(0).tolist(), color="black", label="mixture")
    axes.set_xlabel("x1")
    axes.set_ylabel("density")
    axes.legend(fontsize="small")
    axes.set_title(title)


@torch.no_grad()
def plot_components(x: torch.Tensor, responsibilities: torch.Tensor, weights: torch.Tensor,
                    means: torch.Tensor, covariances: torch.Tensor, path: str | Path, *,
                    title: str = "") -> Path:
    """A fitted mixture over its data: points coloured by responsibilities with component
    ellipses (:func:`draw_components`), or densities for one-column data."""
    figure = Figure(figsize=(5.5, 5))
    axes = figure.subplots()
    if x.shape[1] == 1:
        draw_densities(axes, x, weights, means, covariances, title=title)
    else:
        draw_components(axes, x, responsibilities, weights, means, covariances, title=title)
    return save_figure(figure, path)


@torch.no_grad()
def plot_run_components(experiment, path: str | Path) -> Path:
    """``zoo plot RUN --kind components`` for a GMM run, also drawn after every training run:
    the training rows coloured by the exact responsibilities p(z | x) with the fitted
    components; for a guide that exposes q(z | x) (amortized) a second panel colours the rows
    by q instead. Warns when a fitted component sits at the variance floor (collapsed), which
    the figure would show only as a tiny ellipse."""
    model, guide, x = experiment.model, experiment.guide, experiment.data.x_train
    warn_if_floor_binds(model)
    weights, means, covariances = model.weights, model.means, model.covariances
    name = f"gmm, K = {model.components}, {model.covariance} covariances"
    if x.shape[1] == 1 or not offers(guide, DISCRETE_POSTERIOR):
        return plot_components(x, model.responsibilities(x), weights, means, covariances, path,
                               title=f"{name}: exact responsibilities")
    figure = Figure(figsize=(11, 5), layout="constrained")
    left, right = figure.subplots(1, 2)
    plane = principal_plane(x)
    draw_components(left, x, model.responsibilities(x), weights, means, covariances,
                    plane=plane, title=f"{name}: exact p(z | x)")
    draw_components(right, x, guide.responsibilities(x), weights, means, covariances,
                    plane=plane, title="amortized q(z | x)")
    return save_figure(figure, path)
