"""The exponential-normal model's figure (:mod:`zoo.models.expnormal`). Like :mod:`zoo.plots`, it
draws on a fresh ``matplotlib.figure.Figure`` (no pyplot), saves it to ``path`` and returns the
path."""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch.distributions import kl_divergence

from zoo.plots import save_figure

EXPNORMAL_FIT_X = (-1.0, 0.5, 2.0, 4.0)
"""The observations :func:`plot_expnormal_fits` shows: a boundary mode, two in between, a nearly
Gaussian posterior."""


@torch.no_grad()
def plot_expnormal_fits(experiment, path: str | Path) -> Path:
    """The expnormal model's exact posterior p(z | x) (black) against the run's q(z | x) (red)
    for each x in ``EXPNORMAL_FIT_X``, with the posterior mass q misses shaded (the area where
    p > q, which is the total variation distance) and KL(q || p) in each title: where the
    reverse KL fits the mode and where it loses mass."""
    model, guide = experiment.model, experiment.guide
    figure = Figure(figsize=(3.2 * len(EXPNORMAL_FIT_X), 3.4), layout="constrained")
    for axes, value in zip(figure.subplots(1, len(EXPNORMAL_FIT_X)), EXPNORMAL_FIT_X, strict=True):
        x = torch.tensor([[value]])
        p, q = model.posterior(x).base_dist, guide.distribution(x).base_dist
        z = torch.linspace(1e-4, max(5.0, value + 3.5), 600)[:, None]          # [G, 1]
        p_density, q_density = (d.log_prob(z).exp()[:, 0] for d in (p, q))
        lost = torch.trapezoid((p_density - q_density).clamp(min=0), z[:, 0])
        kl = kl_divergence(q, p).item()
        axes.plot(z[:, 0], p_density, color="black", label="exact p(z|x)")
        axes.plot(z[:, 0], q_density, color="tab:red", label="q(z|x)")
        axes.fill_between(z[:, 0], q_density, p_density, where=p_density > q_density,
                          color="grey", alpha=0.35, label=f"mass q misses ({lost:.2f})")
        axes.set_title(f"x = {value:g}: KL(q||p) = {kl:.3f}")
        axes.set_xlabel("z")
        axes.legend(fontsize="small")
    figure.suptitle(f"{experiment.entry.name}: {experiment.config['guide']} guide against the "
                    f"exact posterior")
    return save_figure(figure, path)
