"""The figures of a run folder: which kinds a run offers (the model's own, from its entry, and
the engine's ``posterior`` and ``loss``), and the ones every training run draws."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from zoo import plots
from zoo.contract import DISTRIBUTION, EXACT_POSTERIOR, MAXIMUM_LIKELIHOOD, offers
from zoo.progress import progress_bar

if TYPE_CHECKING:
    from zoo.experiment import Experiment


def _plot_loss(experiment: Experiment, path: Path) -> Path:
    """The loss curves of the run's history, with the closed-form optimum as reference when
    the model has one."""
    model, x = experiment.model, experiment.data.x_train
    reference = None
    if offers(model, MAXIMUM_LIKELIHOOD):
        reference = -model.maximum_likelihood(x).marginal_log_prob(x).mean().item()
    return plots.plot_training(experiment.history, path, reference=reference,
                               reference_label="closed-form optimum")


POSTERIOR_POINTS = 6
"""Training points whose exact and approximate posteriors the ``posterior`` figure draws."""


def _plot_posterior(experiment: Experiment, path: Path) -> Path:
    points = experiment.data.x_train[:POSTERIOR_POINTS]
    return plots.plot_posterior_ellipses(
        experiment.model.posterior(points), experiment.guide.distribution(points), path,
        title=f"{experiment.entry.name}: exact vs {experiment.config['guide']} guide")


def plot_kinds(experiment: Experiment) -> dict[str, Any]:
    """Every figure of a run, ``kind -> plot(experiment, path) -> path``: the model's own
    (``ModelEntry.plots``), then ``posterior`` (exact against approximate posteriors of a few
    training points over the first two latent dimensions) when the model has a closed-form
    posterior and the guide exposes q with at least two dimensions, then ``loss``."""
    model, guide = experiment.model, experiment.guide
    kinds = dict(experiment.entry.plots)
    if offers(model, EXACT_POSTERIOR) and offers(guide, DISTRIBUTION):
        points = experiment.data.x_train[:POSTERIOR_POINTS]
        if guide.distribution(points).event_shape[-1:] >= (2,):
            kinds["posterior"] = _plot_posterior
    kinds["loss"] = _plot_loss
    return kinds


def training_figures(experiment: Experiment) -> list[str]:
    """The kinds every training run draws, in reading order: the loss curves, the posterior
    figure where there is one, and the model's own figures (``ModelEntry.figures``)."""
    kinds = plot_kinds(experiment)
    return ["loss", *(["posterior"] if "posterior" in kinds else []), *experiment.entry.figures]


@torch.no_grad()
def draw_figures(experiment: Experiment, history: list[dict[str, float]], folder: Path
                 ) -> list[Path]:
    """Draw the :func:`training_figures` of a run that has just trained into ``folder``, with
    a progress bar unless the run is quiet."""
    experiment.history = history
    experiment.model.eval(), experiment.guide.eval()
    kinds, names = plot_kinds(experiment), training_figures(experiment)
    if experiment.entry.images and experiment.data.image_shape is None:
        warnings.warn(f"{experiment.data.name} is a table, not images: the figures "
                      f"{', '.join(experiment.entry.figures)} are left out", stacklevel=2)
        names = [name for name in names if name not in experiment.entry.figures]
    figures = []
    with progress_bar(len(names), "training figures", quiet=experiment.settings.quiet,
                      unit="figure") as bar:
        for kind in names:
            figures.append(kinds[kind](experiment, folder / f"{kind}.png"))
            bar.update()
    return figures
