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

Closed-form KL divergences from the Gaussian-based guides to the truncated-normal posterior are
registered with ``torch.distributions.kl`` below, so ``kl_divergence(q, model.posterior(x))``
works for the guides of :mod:`zoo.guides.expnormal`.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import TorchDistribution
from pyro.nn import PyroModule
from torch import Tensor
from torch.distributions import LogNormal, constraints, register_kl
from torch.distributions.utils import broadcast_all

from zoo.errors import ZooError

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class TruncatedNormal(TorchDistribution):
    r"""N(mu, s^2) truncated to z >= 0, with ``loc`` mu and ``scale`` s > 0 of any batch shape.

    Writing a = mu / s, Z = Phi(a) (the mass of N(mu, s^2) on z >= 0) and lambda = phi(a) / Phi(a)
    (the inverse Mills ratio, computed as exp(log phi(a) - log Phi(a)) so that it stays accurate
    for very negative a):

        density  p(z) = phi((z - mu) / s) / (s Z),                      z >= 0
        cdf      F(z) = 1 - Phi((mu - z) / s) / Z
        icdf     F^-1(u) = mu - s Phi^-1((1 - u) Z)
        mean     mu + s lambda
        variance s^2 (1 - lambda (a + lambda))
        entropy  1/2 log(2 pi e) + log s + log Z - a lambda / 2.

    Draws are F^-1 of uniforms, differentiable in mu and s (``rsample``), and clamped at 0 against
    round-off.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.nonnegative
    has_rsample = True

    def __init__(self, loc: Tensor | float, scale: Tensor | float,
                 validate_args: bool | None = None):
        self.loc, self.scale = broadcast_all(loc, scale)
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None) -> TruncatedNormal:
        new = self._get_checked_instance(TruncatedNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc, new.scale = self.loc.expand(batch_shape), self.scale.expand(batch_shape)
        super(TruncatedNormal, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def _a(self) -> Tensor:
        return self.loc / self.scale

    @property
    def _log_Z(self) -> Tensor:
        """log Phi(a), the log mass of the untruncated Gaussian on z >= 0."""
        return torch.special.log_ndtr(self._a)

    @property
    def _mills(self) -> Tensor:
        """lambda = phi(a) / Phi(a)."""
        a = self._a
        return torch.exp(-0.5 * a**2 - _HALF_LOG_2PI - torch.special.log_ndtr(a))

    @property
    def mean(self) -> Tensor:
        return self.loc + self.scale * self._mills

    @property
    def mode(self) -> Tensor:
        return self.loc.clamp(min=0)

    @property
    def variance(self) -> Tensor:
        mills = self._mills
        return (self.scale**2 * (1 - mills * (self._a + mills))).clamp(min=0)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        u = (value - self.loc) / self.scale
        log_p = -0.5 * u**2 - _HALF_LOG_2PI - self.scale.log() - self._log_Z
        return torch.where(value >= 0, log_p, torch.full_like(log_p, -math.inf))

    def cdf(self, value: Tensor) -> Tensor:
        upper = torch.special.ndtr((self.loc - value.clamp(min=0)) / self.scale)
        return 1 - upper / torch.exp(self._log_Z)

    def icdf(self, value: Tensor) -> Tensor:
        Z = torch.exp(self._log_Z)
        return (self.loc - self.scale * torch.special.ndtri((1 - value) * Z)).clamp(min=0)

    def rsample(self, sample_shape: tuple[int, ...] = ()) -> Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        u = torch.rand(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.icdf(u)

    def entropy(self) -> Tensor:
        return (0.5 + _HALF_LOG_2PI + self.scale.log() + self._log_Z
                - 0.5 * self._a * self._mills)


def _expected_square(mean: Tensor, variance: Tensor, loc: Tensor) -> Tensor:
    """E[(z - loc)^2] = Var z + (E z - loc)^2."""
    return variance + (mean - loc) ** 2


def _cross_entropy(mean: Tensor, variance: Tensor, p: TruncatedNormal) -> Tensor:
    """-E_q[log p(z)] for a q on z >= 0 with the given mean and variance (it needs no more)."""
    return (_HALF_LOG_2PI + p.scale.log() + p._log_Z
            + 0.5 * _expected_square(mean, variance, p.loc) / p.scale**2)


@register_kl(TruncatedNormal, TruncatedNormal)
def _kl_truncated_truncated(q: TruncatedNormal, p: TruncatedNormal) -> Tensor:
    """KL(q || p) = -H(q) - E_q[log p]: both live on z >= 0, so it is finite."""
    return _cross_entropy(q.mean, q.variance, p) - q.entropy()


@register_kl(LogNormal, TruncatedNormal)
def _kl_lognormal_truncated(q: LogNormal, p: TruncatedNormal) -> Tensor:
    """KL(q || p) for q = LogNormal(m, s), whose mean e^(m + s^2/2) and variance
    (e^(s^2) - 1) e^(2m + s^2) are all that -E_q[log p] needs."""
    m, s2 = q.loc, q.scale**2
    mean = torch.exp(m + s2 / 2)
    variance = torch.expm1(s2) * torch.exp(2 * m + s2)
    return _cross_entropy(mean, variance, p) - q.entropy()


def posterior(x: Tensor) -> dist.Independent:
    """p(z_n | x_n) = N(x_n - 1, 1) truncated to z >= 0: batch shape [N], event shape [1]."""
    return TruncatedNormal(x - 1, torch.ones_like(x)).to_event(1)


def marginal_log_prob(x: Tensor) -> Tensor:
    """log p(x_n) = 1/2 - x_n + log Phi(x_n - 1) for ``x: [N, 1]``, shape [N]."""
    return (0.5 - x + torch.special.log_ndtr(x - 1)).sum(-1)


class ExpNormal(PyroModule):
    """z ~ Exponential(1), x | z ~ N(z, 1) as a Pyro model without parameters.

    ``forward(x)`` has sample sites ``"z"`` (latent, ``[N, 1]``) and ``"x"`` (observed,
    ``[N, 1]``) inside the plate ``"data"`` at dim -1; under a particle plate at dim -2 the draws
    broadcast to ``z: [K, N, 1]``. ``posterior`` and ``marginal_log_prob`` are the closed forms
    of the module docstring. ``data_dim`` must be 1: the observation is a scalar.
    """

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
