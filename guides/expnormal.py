r"""Amortized guides q(z | x) for the exponential-normal model (:mod:`zoo.models.expnormal`).

Both guides mirror the model: ``forward(x)`` with ``x: [N, 1]`` samples the site ``"z"``,
``[N, 1]``, in the plate ``"data"`` at dim -1. Both encode x with a small network,
``recognition_net: 1 -> hidden -> 2``, into a location mu(x) and a scale s(x) = softplus(.) > 0,
and differ in the family they shape with them.

The support matters more than the shape. The prior puts no mass on z < 0, so neither does the
posterior, and the reverse KL that the ELBO minimizes,

    KL(q || p) = E_q[log q(z | x) - log p(z | x)],

is infinite for any q that puts mass where p(z | x) = 0: reverse KL is zero-forcing. A Gaussian
on the whole real line is therefore not a usable guide at all (its ELBO is -infinity, and
Pyro's Exponential refuses negative draws). There are two ways to keep a Gaussian shape on
z >= 0, one guide each:

- :class:`NormalGuide` (``normal``): restrict the Gaussian to the support, q = N(mu, s^2)
  truncated to z >= 0. This family contains the exact posterior, N(x - 1, 1) truncated, so the
  best amortized guide is exact: every importance weight equals p(x), KL = 0, k-hat degenerate.
- :class:`LogNormalGuide` (``lognormal``): transform a Gaussian, log z ~ N(mu, s^2), which is
  what automatic differentiation variational inference does for a positive latent. It
  approximates: for large x the posterior is nearly N(x - 1, 1) and a log-normal fits it well;
  for small x the posterior has its mode on the boundary z = 0, where every log-normal density
  vanishes. Minimizing the reverse KL then fits the bulk near the boundary and gives up the
  mass at z -> 0 (q is too light there), so the importance weights p / q have a heavy tail
  (large k-hat) exactly for those x. :func:`plot_fits` draws it.

The encoder sees x standardized with the training mean and standard deviation
(``initialize_from_data``), like the PPCA guides.
"""

from __future__ import annotations

from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from matplotlib.figure import Figure
from pyro.nn import PyroModule
from torch import Tensor, nn
from torch.distributions import kl_divergence

from zoo import plots
from zoo.models.expnormal import TruncatedNormal

MIN_SCALE = 1e-3
"""Added to the softplus of the scale, so that q never collapses to a point."""

FIT_X = (-1.0, 0.5, 2.0, 4.0)
"""The observations :func:`plot_fits` shows: a boundary mode, two in between, a nearly
Gaussian posterior."""


class _EncoderGuide(PyroModule):
    """What both guides share: ``recognition_net`` from standardized x to (mu, s), and the site
    ``"z"`` in the plate ``"data"``. Subclasses turn (mu, s) into q in ``distribution``."""

    def __init__(self, data_dim: int = 1, hidden_dim: int = 32):
        super().__init__()
        self.data_dim = data_dim
        self.recognition_net = PyroModule[nn.Sequential](
            nn.Linear(data_dim, hidden_dim), nn.Softplus(), nn.Linear(hidden_dim, 2))
        self.register_buffer("shift", torch.zeros(data_dim))
        self.register_buffer("scale_in", torch.ones(data_dim))

    def initialize_from_data(self, x: Tensor) -> None:
        """Standardize the encoder's input with the mean and standard deviation of ``x: [N, 1]``
        (a constant column keeps scale 1)."""
        std = x.std(0)
        self.shift.copy_(x.mean(0))
        self.scale_in.copy_(torch.where(std > 0, std, torch.ones_like(std)))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mu(x), s(x)), each ``[N, 1]``."""
        out = self.recognition_net((x - self.shift) / self.scale_in)
        return out[..., :1], nn.functional.softplus(out[..., 1:]) + MIN_SCALE

    def forward(self, x: Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", self.distribution(x))


class NormalGuide(_EncoderGuide):
    """q(z_n | x_n) = N(mu(x_n), s(x_n)^2) truncated to z >= 0: the exact posterior's family."""

    def distribution(self, x: Tensor) -> dist.Independent:
        """q(z | x) as ``Independent(TruncatedNormal(mu, s), 1)``: batch [N], event [1]."""
        return TruncatedNormal(*self.encode(x)).to_event(1)


class LogNormalGuide(_EncoderGuide):
    """q(z_n | x_n) = LogNormal(mu(x_n), s(x_n)): log z_n ~ N(mu(x_n), s(x_n)^2)."""

    def distribution(self, x: Tensor) -> dist.Independent:
        """q(z | x) as ``Independent(LogNormal(mu, s), 1)``: batch [N], event [1]."""
        return dist.LogNormal(*self.encode(x)).to_event(1)


@torch.no_grad()
def plot_fits(experiment, path: str | Path) -> Path:
    """The exact posterior p(z | x) (black) against the run's q(z | x) (red) for each x in
    ``FIT_X``, with the posterior mass q misses shaded (the area where p > q, which is the total
    variation distance) and KL(q || p) in each title: where the reverse KL fits the mode and
    where it loses mass."""
    model, guide = experiment.model, experiment.guide
    figure = Figure(figsize=(3.2 * len(FIT_X), 3.4), layout="constrained")
    for axes, value in zip(figure.subplots(1, len(FIT_X)), FIT_X, strict=True):
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
    return plots.save_figure(figure, path)
