r"""KL divergences between a guide's q and a distribution p of the same latent variable: in
closed form where torch has one, also for a Gaussian pair of which one is diagonal and the
other full (:func:`as_multivariate`), else estimated by Monte Carlo: :func:`posterior_kl`, the
KL to an exact posterior that the diagnostics and the evaluation report. :func:`closed_form_kl`
is that chain without the estimate, for the ELBO's KL term (:func:`latent_kl`), which falls
back on the Monte-Carlo terms of its own draws. :func:`free_bits_kl` takes the KL of each
dimension of a factorized Gaussian."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor
from torch.distributions import (
    Distribution,
    Independent,
    MultivariateNormal,
    Normal,
    kl_divergence,
)

from zoo.contract import DATA_PLATE
from zoo.errors import ZooError
from zoo.objectives.draws import Draws
from zoo.objectives.sites import alike, latent_sites


def as_multivariate(distribution: Distribution) -> Distribution:
    """A diagonal Gaussian ``Independent(Normal, 1)`` as the equal ``MultivariateNormal``, so
    that its KL divergence to a full-covariance Gaussian has a closed form."""
    if (isinstance(distribution, Independent) and isinstance(distribution.base_dist, Normal)
            and distribution.reinterpreted_batch_ndims == 1):
        normal = distribution.base_dist
        loc, scale = torch.broadcast_tensors(normal.loc, normal.scale)
        return MultivariateNormal(loc, scale_tril=torch.diag_embed(scale))
    return distribution


def closed_form_kl(q: Distribution, p: Distribution) -> Tensor | None:
    """KL(q || p) in closed form, or None where torch knows none (also for a Gaussian pair of
    which one is diagonal and the other full, through :func:`as_multivariate`)."""
    for pair in ((q, p), (as_multivariate(q), as_multivariate(p))):
        with contextlib.suppress(NotImplementedError):
            return kl_divergence(*pair)
    return None


def posterior_kl(q: Distribution, p: Distribution, *, num_draws: int = 4000) -> Tensor:
    """KL(q || p) per data point, ``[N]``: in closed form where there is one
    (:func:`closed_form_kl`; round-off below 0 is set to 0), else the Monte-Carlo mean of
    log q(z) - log p(z) over ``num_draws`` draws from q."""
    kl = closed_form_kl(q, p)
    if kl is not None:
        return kl.clamp(min=0)
    z = q.sample((num_draws,))
    return (q.log_prob(z) - p.log_prob(z)).mean(0)


def _weighted_alike(guide_site: dict, model_site: dict) -> bool:
    """Whether guide and model mask and scale a latent site alike, so that the Monte-Carlo
    terms m (log q(z) - log p(z)) have the expectation m KL(q || p)."""
    return (alike(guide_site["mask"], model_site["mask"])
            and alike(guide_site["scale"], model_site["scale"]))


def latent_kl(draws: Draws) -> Tensor | None:
    """sum over latent sites of KL(q(z | x) || p(z)) in closed form, each masked (and, when
    joint, scaled) as its site, ``[K, N]`` (the same for every particle); or None when a site
    has no closed form, no prior of its own, or a mask or scale in the guide other than in the
    model (then only the Monte-Carlo terms mean what they do)."""
    total = torch.zeros(draws.shape, device=draws.device)
    for name, guide_site in latent_sites(draws.guide_trace):
        model_site = draws.model_trace.nodes.get(name)
        if model_site is None or not _weighted_alike(guide_site, model_site):
            return None
        kl = closed_form_kl(guide_site["fn"], model_site["fn"])
        if kl is None:
            return None
        total = total + draws.per_point(guide_site, kl)
    return total


def free_bits_kl(draws: Draws, free_bits: float) -> Tensor:
    """The free-bits KL term of each data point of a minibatch, ``[N]``:

        m_n sum_d max(lambda, mean_{n': m_n' = 1} KL_n'd)

    summed over the latent sites, with KL_nd = 1/2 (mu_nd^2 + s_nd^2 - 1 - log s_nd^2) the
    closed-form KL of a factorized Gaussian q from a standard normal prior in dimension d and
    m_n the site's mask (1 without one): masked data points count as absent."""
    if draws.joint:
        raise ZooError(f"--free-bits counts KL per data point, and this model has a site outside "
                       f"the '{DATA_PLATE}' plate (a global latent variable) or sites of "
                       f"different scales; drop --free-bits")
    total = torch.zeros(draws.shape[1], device=draws.device)
    for name, guide_site in latent_sites(draws.guide_trace):
        model_site = draws.model_trace.nodes[name]
        q, p = guide_site["fn"], model_site["fn"]
        if not (_is_diagonal_normal(q) and _is_diagonal_normal(p)
                and bool((p.base_dist.loc == 0).all()) and bool((p.base_dist.scale == 1).all())):
            raise ZooError(
                f"--free-bits needs a factorized Gaussian guide and a standard normal prior; "
                f"site '{name}' has guide {type(q).__name__} and prior {type(p).__name__}. "
                f"Use a mean-field guide or drop --free-bits")
        if not alike(guide_site["mask"], model_site["mask"]):
            raise ZooError(f"--free-bits needs the same mask on site '{name}' in model and guide")
        kl = kl_divergence(q.base_dist, p.base_dist)  # [(K,) N, M], equal over particles
        kl = kl.reshape(*draws.shape, -1)  # [K, N, M]
        m = draws.per_point(guide_site, torch.ones(draws.shape, device=draws.device))  # [K, N]
        per_dimension = (m.unsqueeze(-1) * kl).sum((0, 1)) / m.sum().clamp(min=1)
        total = total + m.mean(0) * per_dimension.clamp(min=free_bits).sum()
    return total


def _is_diagonal_normal(distribution: Distribution) -> bool:
    return isinstance(distribution, Independent) and isinstance(distribution.base_dist, Normal)
