r"""Distributions and constraints the models share, kept out of the model files so that each
model reads as its generative story.

- :class:`TruncatedNormal`, N(mu, s^2) restricted to z >= 0, with closed-form KL divergences
  from itself and from a log-normal (the posterior of :mod:`zoo.models.expnormal` and its
  guides);
- :class:`FlooredLowerCholesky`, lower-triangular matrices with a diagonal above a floor (the
  component scales of :mod:`zoo.models.gmm`).
"""

from __future__ import annotations

import math

import torch
from pyro.distributions import TorchDistribution
from torch import Tensor
from torch.distributions import LogNormal, biject_to, constraints, register_kl, transform_to
from torch.distributions.transforms import Transform
from torch.distributions.utils import broadcast_all

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)

TAIL = -3.0
"""Below this a = mu / s, :class:`TruncatedNormal` computes with its far-tail formulas."""
CONTINUED_FRACTION_TERMS = 40
"""Terms of Laplace's continued fraction: relative error below 1e-13 for a <= ``TAIL``."""
NEWTON_STEPS = 4
"""Newton steps of a far-tail draw; three reach machine precision for a <= ``TAIL``."""


def _split(a: Tensor) -> tuple[Tensor, Tensor]:
    """a clamped to the bulk (a >= ``TAIL``) and to the tail (a <= ``TAIL``): each branch of a
    ``torch.where`` is computed on its own side, so the branch not taken stays finite and so
    does its gradient (which ``torch.where`` multiplies by 0)."""
    return a.clamp(min=TAIL), a.clamp(max=TAIL)


def _log_mills_ratio(a: Tensor) -> Tensor:
    """log M(a) = log(Phi(a) / phi(a)) = log(sqrt(pi / 2) erfcx(-a / sqrt 2)) for a <= 0, about
    -log |a| however negative a is."""
    return 0.5 * math.log(math.pi / 2) + torch.log(torch.special.erfcx(-a / math.sqrt(2)))


def _inverse_mills_ratio(a: Tensor) -> Tensor:
    """lambda = phi(a) / Phi(a) for a >= ``TAIL``."""
    return torch.exp(-0.5 * a**2 - _HALF_LOG_2PI - torch.special.log_ndtr(a))


def _standard_moments(a: Tensor) -> tuple[Tensor, Tensor]:
    """Mean m and variance v of d ~ N(a, 1) truncated to d >= 0 (see :class:`TruncatedNormal`)."""
    bulk, tail = _split(a)
    lam = _inverse_mills_ratio(bulk)
    m_bulk = bulk + lam
    v_bulk = 1 - lam * m_bulk
    x, c = -tail, torch.zeros_like(tail)
    for k in range(CONTINUED_FRACTION_TERMS, 1, -1):
        c = k / (x + c)
    m_tail = 1 / (x + c)
    v_tail = m_tail * (c - m_tail)
    in_tail = a < TAIL
    return torch.where(in_tail, m_tail, m_bulk), torch.where(in_tail, v_tail, v_bulk).clamp(min=0)


def _tail_log_survival(a: Tensor, d: Tensor) -> Tensor:
    """log S = log(Phi(a - d) / Phi(a)) = -d (d / 2 - a) + log M(a - d) - log M(a), a <= 0."""
    return -d * (d / 2 - a) + _log_mills_ratio(a - d) - _log_mills_ratio(a)


def _log_survival(a: Tensor, d: Tensor) -> Tensor:
    """log S = log(Phi(a - d) / Phi(a)) at the standardized d >= 0."""
    bulk, tail = _split(a)
    return torch.where(a < TAIL, _tail_log_survival(tail, d),
                       torch.special.log_ndtr(bulk - d) - torch.special.log_ndtr(bulk))


def _newton_step(a: Tensor, d: Tensor, log_w: Tensor) -> Tensor:
    """One Newton step towards log S(d) = log w: d + (log S(d) - log w) / h(d), with the hazard
    rate h(d) = -d log S / dd = phi(a - d) / Phi(a - d) = 1 / M(a - d)."""
    return d + (_tail_log_survival(a, d) - log_w) * torch.exp(_log_mills_ratio(a - d))


def _inverse_survival(a: Tensor, log_w: Tensor) -> Tensor:
    """The standardized d >= 0 with log S(d) = ``log_w`` <= 0: d = a - Phi^-1(w Phi(a)) in the
    bulk, Newton's method in the far tail (see :class:`TruncatedNormal`)."""
    bulk, tail = _split(a)
    direct = bulk - torch.special.ndtri(torch.exp(log_w + torch.special.log_ndtr(bulk)))
    E = -log_w
    with torch.no_grad():                      # the root of d (d / 2 - a) = E, in a stable form
        d = 2 * E / (-tail + torch.sqrt(tail**2 + 2 * E))
        for _ in range(NEWTON_STEPS - 1):
            d = _newton_step(tail, d, log_w)
    d = _newton_step(tail, d, log_w)
    return torch.where(a < TAIL, d, direct).clamp(min=0)


class TruncatedNormal(TorchDistribution):
    r"""N(mu, s^2) truncated to z >= 0, with ``loc`` mu and ``scale`` s > 0 of any batch shape.

    Standardized, with a = mu / s and d = z / s ~ N(a, 1) truncated to d >= 0: the mass of
    N(mu, s^2) on z >= 0 is Phi(a), and with the inverse Mills ratio lambda = phi(a) / Phi(a),

        density   p(z) = phi(d - a) / (s Phi(a)),                        z >= 0
        survival  S(z) = 1 - F(z) = Phi(a - d) / Phi(a)
        mean      s m,      m = a + lambda
        variance  s^2 v,    v = 1 - lambda m
        entropy   1/2 log(2 pi e) + log s + log Phi(a) - a lambda / 2.

    Draws invert the survival function: z = s d with S(z) = w for w ~ U(0, 1], which is
    d = a - Phi^-1(w Phi(a)), differentiable in mu and s (``rsample``).

    The far tail, a < ``TAIL`` = -3. Almost all of N(mu, s^2) lies below 0 and z piles up
    against the boundary, about s / |a| from it. Phi(a) underflows (in float32 below a = -13,
    in float64 below a = -38), and the formulas above cancel terms of size a^2 / 2 to leave a
    result of size 1 / |a|. There, with the Mills ratio M(a) = Phi(a) / phi(a) (its logarithm
    is about -log |a|) and the a^2 terms cancelled by hand,

        log p(z) = -d (d / 2 - a) - log M(a) - log s
        log S(z) = -d (d / 2 - a) + log M(a - d) - log M(a)
        entropy  = 1/2 + log s + log M(a) - a m / 2,

    and m and v come from Laplace's continued fraction M(-x) = 1 / (x + 1 / (x + 2 / (x + ...))):
    with c = 2 / (x + 3 / (x + 4 / ...)) and x = -a, m = 1 / (x + c) and v = m (c - m). A draw
    solves log S(z) = log w by Newton's method in d, started at the root of
    d (d / 2 - a) = -log w (the Gaussian factor of S without the slowly varying Mills ratios;
    deep in the tail d ~ -log(w) / |a|, an exponential draw of rate |a|). The start lies above
    the solution and log S is concave (the truncated normal is log-concave), so the iterates
    decrease to it. The last step is taken with gradients: at the solution it carries the
    implicit derivative dd/da = -(d log S / da) / (d log S / dd).
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
    def mean(self) -> Tensor:
        return self.scale * _standard_moments(self._a)[0]

    @property
    def mode(self) -> Tensor:
        return self.loc.clamp(min=0)

    @property
    def variance(self) -> Tensor:
        return self.scale**2 * _standard_moments(self._a)[1]

    def _log_density(self, value: Tensor) -> Tensor:
        """log phi(d - a) - log Phi(a) - log s at any real z, the log density without the
        support's cut: a quadratic in z with leading coefficient -1 / (2 s^2)."""
        a, d = self._a, value / self.scale
        bulk, tail = _split(a)
        return torch.where(
            a < TAIL, -d * (d / 2 - tail) - _log_mills_ratio(tail),
            -0.5 * (d - bulk) ** 2 - _HALF_LOG_2PI - torch.special.log_ndtr(bulk)
        ) - self.scale.log()

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        log_p = self._log_density(value)
        return torch.where(value >= 0, log_p, torch.full_like(log_p, -math.inf))

    def cdf(self, value: Tensor) -> Tensor:
        return -torch.expm1(_log_survival(self._a, value.clamp(min=0) / self.scale))

    def icdf(self, value: Tensor) -> Tensor:
        """F^-1(u) = S^-1(1 - u)."""
        return self.scale * _inverse_survival(self._a, torch.log1p(-value))

    def rsample(self, sample_shape: tuple[int, ...] = ()) -> Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        return self.icdf(torch.rand(shape, dtype=self.loc.dtype, device=self.loc.device))

    def entropy(self) -> Tensor:
        a = self._a
        bulk, tail = _split(a)
        return self.scale.log() + torch.where(
            a < TAIL, 0.5 + _log_mills_ratio(tail) - 0.5 * tail * _standard_moments(tail)[0],
            0.5 + _HALF_LOG_2PI + torch.special.log_ndtr(bulk)
            - 0.5 * bulk * _inverse_mills_ratio(bulk))


def _cross_entropy(mean: Tensor, variance: Tensor, p: TruncatedNormal) -> Tensor:
    """-E_q[log p(z)] for a q on z >= 0 with the given mean and variance (it needs no more): log p
    is a quadratic in z with leading coefficient -1 / (2 s^2) there, so its expectation is
    log p(E_q z) - Var_q z / (2 s^2)."""
    return 0.5 * variance / p.scale**2 - p._log_density(mean)


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


class FlooredLowerCholesky(constraints.Constraint):
    """Lower-triangular matrices whose diagonal entries all exceed ``floor``."""

    event_dim = 2

    def __init__(self, floor: float):
        super().__init__()
        self.floor = floor

    def check(self, value: Tensor) -> Tensor:
        lower = (value.tril() == value).flatten(-2).all(-1)
        return lower & (value.diagonal(dim1=-2, dim2=-1) > self.floor).all(-1)


class FlooredLowerCholeskyTransform(Transform):
    """Unconstrained square matrices A -> tril(A, -1) + diag(floor + exp(diag A))."""

    domain = constraints.independent(constraints.real, 2)
    bijective = True

    def __init__(self, floor: float, cache_size: int = 0):
        super().__init__(cache_size=cache_size)
        self.floor = floor

    @property
    def codomain(self) -> constraints.Constraint:
        return FlooredLowerCholesky(self.floor)

    def __eq__(self, other) -> bool:
        return isinstance(other, FlooredLowerCholeskyTransform) and other.floor == self.floor

    def with_cache(self, cache_size: int = 1) -> FlooredLowerCholeskyTransform:
        return self if self._cache_size == cache_size else type(self)(self.floor, cache_size)

    def _call(self, A: Tensor) -> Tensor:
        return A.tril(-1) + torch.diag_embed(self.floor + A.diagonal(dim1=-2, dim2=-1).exp())

    def _inverse(self, L: Tensor) -> Tensor:
        return L.tril(-1) + torch.diag_embed((L.diagonal(dim1=-2, dim2=-1) - self.floor).log())


for _registry in (biject_to, transform_to):  # so that PyroParam(..., constraint=...) works
    _registry.register(FlooredLowerCholesky)(
        lambda constraint: FlooredLowerCholeskyTransform(constraint.floor))
