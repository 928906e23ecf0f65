r"""The exponential-normal teaching model of the course notes: a positive latent seen in noise.

Generative process, independently for each row n = 1, ..., N:

    z_n ~ Exponential(1)                 (density e^-z for z >= 0, zero for z < 0)
    x_n | z_n ~ N(z_n, 1)

Shapes: ``x: [N, 1]``, ``z: [N, 1]`` (a latent of size M = 1, kept as an event dimension so that
the model has the same site shapes as every other model of the zoo). The model has no learnable
parameters: it is there to study approximations of a posterior that is not Gaussian.

Posterior. For z >= 0, completing the square in the exponent,

    log p(x, z) = -z - (x - z)^2 / 2 - 1/2 log(2 pi)
                = -(z - (x - 1))^2 / 2 + 1/2 - x - 1/2 log(2 pi),

so p(z | x) is N(x - 1, 1) truncated to z >= 0 (:class:`TruncatedNormal`): for large x a nearly
complete Gaussian around x - 1, for small x a half-Gaussian piled against the boundary z = 0,
where its mode sits and where the prior cuts it off.

Marginal likelihood. Integrating the same square over z >= 0,

    p(x) = e^(1/2 - x) Phi(x - 1),       log p(x) = 1/2 - x + log Phi(x - 1),

the exponentially modified Gaussian. Phi has no expression in elementary functions, but it is
computed to machine precision (``torch.special.log_ndtr`` for its logarithm, accurate in the
far left tail too), so log p(x) is exact for all practical purposes.

The truncated normal and its closed-form KL divergences from the guides' families live in
:mod:`zoo.distributions`, so ``kl_divergence(q, model.posterior(x))`` works for the guides of
:mod:`zoo.guides.expnormal`.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import Tensor

from zoo.contract import EXACT_MARGINAL, EXACT_POSTERIOR
from zoo.distributions import TruncatedNormal
from zoo.errors import ZooError


class ExpNormal(PyroModule):
    """z ~ Exponential(1), x | z ~ N(z, 1) as a Pyro model without parameters.

    ``forward(x)`` has sample sites ``"z"`` (latent, ``[N, 1]``) and ``"x"`` (observed,
    ``[N, 1]``) inside the plate ``"data"`` at dim -1; under a particle plate at dim -2 the draws
    broadcast to ``z: [K, N, 1]``. ``posterior`` and ``marginal_log_prob`` are the closed forms
    of the module docstring. ``data_dim`` must be 1: the observation is a scalar.
    """

    offers = frozenset({EXACT_MARGINAL, EXACT_POSTERIOR})

    def __init__(self, data_dim: int = 1):
        super().__init__()
        if data_dim != 1:
            raise ZooError(f"the expnormal model observes one number per data point, so its data "
                           f"must have exactly 1 column; got D = {data_dim}")
        self.data_dim = data_dim
        self.latent_dim = 1

    def _check(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != 1:
            raise ZooError(f"expnormal data must have shape [N, 1]; got shape {list(x.shape)}")
        return x

    def forward(self, x: Tensor) -> None:
        """p(x, z) = prod_n Exponential(z_n | 1) N(x_n | z_n, 1), ``x: [N, 1]``."""
        self._check(x)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Exponential(x.new_ones(1)).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def posterior(self, x: Tensor) -> dist.Independent:
        """Exact p(z_n | x_n), a truncated normal: batch shape [N], event shape [1]."""
        return posterior(self._check(x))

    def marginal_log_prob(self, x: Tensor) -> Tensor:
        """Exact log p(x_n), shape [N]."""
        return marginal_log_prob(self._check(x))


def posterior(x: Tensor) -> dist.Independent:
    """p(z_n | x_n) = N(x_n - 1, 1) truncated to z >= 0: batch shape [N], event shape [1]."""
    return TruncatedNormal(x - 1, torch.ones_like(x)).to_event(1)


def marginal_log_prob(x: Tensor) -> Tensor:
    """log p(x_n) = 1/2 - x_n + log Phi(x_n - 1) for ``x: [N, 1]``, shape [N]."""
    return (0.5 - x + torch.special.log_ndtr(x - 1)).sum(-1)
