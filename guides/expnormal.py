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
  (large k-hat) exactly for those x. :func:`zoo.figures.expnormal.plot_expnormal_fits` draws it.

The encoder sees x standardized with the training mean and standard deviation
(``initialize_from_data``), like the PPCA guides.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
from pyro.nn import PyroModule
from torch import Tensor, nn

from zoo import standardize
from zoo.contract import DISTRIBUTION
from zoo.distributions import TruncatedNormal

MIN_SCALE = 1e-3
"""Added to the softplus of the scale, so that q never collapses to a point."""


class _EncoderGuide(PyroModule):
    """What both guides share: ``recognition_net`` from standardized x to (mu, s), and the site
    ``"z"`` in the plate ``"data"``. Subclasses turn (mu, s) into q in ``distribution``."""

    offers = frozenset({DISTRIBUTION})

    def __init__(self, data_dim: int = 1, hidden_dim: int = 32):
        super().__init__()
        self.data_dim = data_dim
        self.recognition_net = PyroModule[nn.Sequential](
            nn.Linear(data_dim, hidden_dim), nn.Softplus(), nn.Linear(hidden_dim, 2))
        standardize.add_buffers(self, data_dim)

    def initialize_from_data(self, x: Tensor) -> None:
        """Standardize the encoder's input with the mean and standard deviation of ``x: [N, 1]``
        (a constant column keeps scale 1)."""
        standardize.fit(self, x)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mu(x), s(x)), each ``[N, 1]``."""
        out = self.recognition_net(standardize.standardized(self, x))
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
