r"""Diagnostics of an amortized guide against the exact posterior, stored and drawn with ArviZ.

For a trained model and guide and a few data points x_1, ..., x_N, :func:`diagnose` compares the
guide's q(z | x_n) with the posterior p(z | x_n) of the trained model, point by point. This is the
only module of zoo that imports ArviZ.

The reference posterior. Where the model knows it in closed form (``model.posterior(x)``, a
torch distribution: PPCA, the expnormal teaching model), exact draws; for a mixture,
``model.responsibilities(x)``; elsewhere (VAE, CVAE) long runs of NUTS (``pyro.infer.MCMC``) on
p(z | x) proportional to p(x, z), the model's own program conditioned on the first few points,
which :func:`nuts_posterior` makes trustworthy by reproducing PPCA's closed form in the tests.

Per data point, with S draws z_s ~ q(z | x_n) and log weights
log w_s = log p(x_n, z_s) - log q(z_s | x_n):

- ``posterior_kl``: KL(q || p) in closed form where torch knows one (Gaussian pairs, the
  expnormal guides), else E_q[log q - log p(z | x)] by Monte Carlo, else (no closed-form
  posterior) log p(x) - ELBO with log p(x) importance-sampled.
- ``mean_error``, ``sd_error``: root mean squares over latent dimensions of E_q z - E_p z and of
  sd_q z - sd_p z; ``wasserstein``: the 2-Wasserstein distance of the Gaussians with q's and p's
  means and covariances,

      W_2^2 = |m_q - m_p|^2 + tr(S_q + S_p - 2 (S_p^1/2 S_q S_p^1/2)^1/2),

  exact for two Gaussians and a lower bound on the W_2 of any pair with those moments
  (Gelbrich 1990).
- ``khat``: the Pareto shape of the right tail of the weights (PSIS; Vehtari et al. 2024, used
  for variational inference by Yao et al. 2018): fit a generalized Pareto distribution to the
  largest min(S/5, 3 sqrt(S)) weights. k-hat < 0.5: the importance-sampling estimate of
  anything under p converges fast (q is good); 0.5-0.7: usable; > 0.7: unreliable, q misses
  mass that p has. With the exact posterior every weight equals p(x) and there is no tail to
  fit (some implementations, ArviZ's included, return inf); we report k-hat = -inf there and
  count the point as exact (``khat_exact``), never as a failure. A point that is not exact but
  has fewer than five weights above the tail's cutoff (weights that take only a few values,
  or a few weights that dwarf all others) has no tail to fit either: its k-hat is inf, as in
  ArviZ, and the summary counts it in ``khat_unfitted`` instead of averaging it into
  ``khat_max`` and ``khat_mean``. k-hat measures the shape of the tail, not its size: weights
  that barely vary (ESS close to S, a nearly exact guide) can still have a large k-hat, so read
  it together with the ESS.
- ``ess``: the importance-sampling effective sample size (sum_s w_s)^2 / sum_s w_s^2, out of S.
- the amortization gap (Cremer, Li & Duvenaud 2018): log p(x) - ELBO(q) splits into
  ``approximation_gap`` = log p(x) - ELBO(q*), q* the member of q's family fitted to this x
  alone, and ``amortization_gap`` = ELBO(q*) - ELBO(q), what sharing one encoder costs.

Over all the points, simulation-based calibration (Talts et al. 2018; for variational inference
Yao et al. 2018): draw z* from the prior and x from p(x | z*), draw L times from q(z | x) and
rank z* among the draws in each latent dimension. If q(z | x) is the posterior, the rank is
uniform on {0, ..., L}; a chi-square test of the binned ranks gives ``sbc_pvalue``
(Bonferroni over latent dimensions). A guide too narrow piles the ranks at both ends, one too
wide in the middle, a biased one on one side. Amortization makes this cheap: one pass of the
encoder over all simulations.

Training, not the posterior: :func:`gradient_snr` measures the signal-to-noise ratio of an
objective's gradient for the encoder's and the decoder's parameters (Rainforth et al. 2018).

Storage: an ``arviz.InferenceData`` with groups ``posterior`` (guide draws ``z``, dims
``(chain, draw, obs, latent)``, and the model's parameters when they are few, constant over
draws), ``reference_posterior`` (exact or NUTS draws, same dims, ``method`` in its attributes),
``observed_data``, ``constant_data`` (labels), ``sample_stats`` (``log_joint`` = log p(x, z) and
``log_q`` = log q(z | x) per draw) and ``metrics`` (the per-point values above), saved as NetCDF.

Protocol (duck typing): the model and guide put their latent site ``"z"`` (event shape [M]) in
the plate ``"data"`` at dim -1, the model observes its first input at one sample site and takes
any further inputs (labels) as given; optional ``model.posterior(*inputs)``,
``model.marginal_log_prob(*inputs)``, ``guide.distribution(*inputs)``, and for mixtures
``model.responsibilities(x)`` with ``guide.responsibilities(x)``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import operator
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import torch
import xarray as xr
from matplotlib.figure import Figure
from pyro import poutine
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide.initialization import init_to_sample, init_to_value
from torch import Tensor, nn
from torch.distributions import (
    Categorical,
    Distribution,
    Independent,
    MultivariateNormal,
    kl_divergence,
    transform_to,
)

from zoo import plots, runs
from zoo.contract import DISCRETE_POSTERIOR, DISTRIBUTION, EXACT_MARGINAL, EXACT_POSTERIOR, offers
from zoo.errors import ZooError
from zoo.evaluate import log_likelihood
from zoo.experiment import load_run
from zoo.objectives import DATA_PLATE, PARTICLE_PLATE, as_multivariate, draw
from zoo.progress import progress_bar
from zoo.report import Section, write_report
from zoo.train import seed_everything

LATENT = "z"
NETCDF = "diagnostics.nc"
SUMMARY = "summary.csv"
DIAGNOSTIC_PLOTS = ("posterior-fit",)
"""Plot kinds of a registry entry (``ModelEntry.plots``) that :func:`diagnose_run` draws too."""

MAX_GLOBALS = 1000
"""Model parameters go into the ``posterior`` group only when they number at most this many in
all (PPCA's W, b, sigma; not a VAE's decoder weights)."""

EQUAL_WEIGHTS_ULPS = 100
"""Log weights that differ by less than this many units in the last place of their magnitude
count as equal: the guide is the exact posterior there."""

KHAT_GOOD, KHAT_USABLE = 0.5, 0.7


@dataclass(frozen=True)
class DiagnosticSettings:
    """How many draws each diagnostic uses; the defaults suit ``zoo diagnose``."""

    num_chains: int = 4
    num_draws: int = 500
    """Guide and exact draws per chain: num_chains * num_draws importance weights per point."""
    nuts_points: int = 4
    nuts_chains: int = 2
    nuts_warmup: int = 300
    nuts_samples: int = 500
    sbc_simulations: int = 1000
    sbc_draws: int = 99
    sbc_bins: int = 10
    local_steps: int = 500
    local_lr: float = 0.05
    local_particles: int = 64
    """Particles per step when the per-point ELBO has no closed form."""
    elbo_particles: int = 4000
    """Particles of the Monte-Carlo ELBOs and importance-sampled log p(x) of the gaps."""
    quiet: bool = False
    """No progress bars (:mod:`zoo.progress`: one per stage, for NUTS and for the gaps)."""


# --- draws from the guide and from the reference ----------------------------------------------

@dataclass
class GuideDraws:
    """S draws per data point from the guide: ``z: [S, N, M]``, ``log_joint`` = log p(x, z) and
    ``log_q`` = log q(z | x), each ``[S, N]``."""

    z: Tensor
    log_joint: Tensor
    log_q: Tensor

    @property
    def log_weights(self) -> Tensor:
        return self.log_joint - self.log_q


@torch.no_grad()
def guide_draws(model, guide, *inputs: Tensor, num_draws: int, chunk: int = 250) -> GuideDraws:
    """``num_draws`` draws from q(z | x_n) for every point, scored by model and guide, in chunks
    of ``chunk`` particles (see :func:`zoo.objectives.draw`)."""
    parts = []
    for done in range(0, num_draws, chunk):
        num_particles = min(chunk, num_draws - done)
        draws = draw(model, guide, *inputs, num_particles=num_particles)
        z = draws.guide_trace.nodes[LATENT]["value"]        # [N, M] for a single particle
        parts.append((z.reshape(num_particles, *z.shape[-2:]),
                      draws.log_likelihood + draws.log_prior, draws.log_q))
    return GuideDraws(*(torch.cat(column) for column in zip(*parts, strict=True)))


@dataclass
class Reference:
    """Draws from the exact posterior of some of the points: ``z: [C, S, n, M]`` for the points
    ``points`` (``[n]``, indices into the diagnosed points), how they were drawn (``method``),
    the closed-form posterior of all N points when there is one, and ``stats`` (NUTS's)."""

    z: Tensor
    points: Tensor
    method: str
    distribution: Distribution | None = None
    stats: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Hold a module's parameters fixed (no gradient) inside the block."""
    flags = [parameter.requires_grad for parameter in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in zip(module.parameters(), flags, strict=True):
            parameter.requires_grad_(flag)


def nuts_posterior(model, *inputs: Tensor, num_chains: int = 2, num_samples: int = 500,
                   warmup_steps: int = 300, init: Tensor | None = None, quiet: bool = False
                   ) -> tuple[Tensor, dict[str, float]]:
    """Draws from p(z | x) for every point of ``inputs`` by NUTS on the model's own program, in
    which x is observed: ``z: [C, S, N, M]`` and the stats ``divergences`` (in all) and
    ``acceptance`` (mean acceptance probability).

    The N points' latents form one vector of N M dimensions sampled jointly (the points are
    independent given the model's parameters, and NUTS adapts one step size to the diagonal
    mass matrix it learns). The chains run one after another, each started at ``init[c]``
    (``[C, N, M]``, for example guide draws), else at a prior draw. The model's parameters are
    held fixed. One progress bar counts the iterations of all chains, unless ``quiet``.
    """
    chains, divergences, acceptance = [], 0, []
    bar = progress_bar(num_chains * (warmup_steps + num_samples),
                       f"NUTS reference, {inputs[0].shape[0]} points", quiet=quiet)
    with _frozen(model), bar:
        for chain in range(num_chains):
            strategy = (init_to_value(values={LATENT: init[chain]}) if init is not None
                        else init_to_sample)
            kernel = NUTS(model, init_strategy=strategy, max_plate_nesting=1)
            bar.set_postfix_str(f"chain {chain + 1} of {num_chains}")
            mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup_steps,
                        disable_progbar=True, hook_fn=lambda *_: bar.update())
            mcmc.run(*inputs)
            chains.append(mcmc.get_samples()[LATENT])
            diagnostics = mcmc.diagnostics()
            divergences += sum(len(value) for value in diagnostics["divergences"].values())
            acceptance += list(diagnostics["acceptance rate"].values())
    return torch.stack(chains).detach(), {"divergences": float(divergences),
                                          "acceptance": float(np.mean(acceptance))}


def reference_posterior(model, *inputs: Tensor, draws: GuideDraws,
                        settings: DiagnosticSettings) -> Reference:
    """Exact draws for every point where the model has ``posterior``, else NUTS on the first
    ``settings.nuts_points`` points, started at guide draws."""
    C, S = settings.num_chains, settings.num_draws
    if offers(model, EXACT_POSTERIOR):
        with torch.no_grad():
            posterior = model.posterior(*inputs)
            z = posterior.sample((C * S,))
        return Reference(z.reshape(C, S, *z.shape[1:]), torch.arange(z.shape[1], device=z.device),
                         "closed form", distribution=posterior)
    n = min(settings.nuts_points, inputs[0].shape[0])
    points = torch.arange(n, device=inputs[0].device)
    z, stats = nuts_posterior(model, *(tensor[:n] for tensor in inputs),
                              num_chains=settings.nuts_chains, num_samples=settings.nuts_samples,
                              warmup_steps=settings.nuts_warmup,
                              init=draws.z[:settings.nuts_chains, :n], quiet=settings.quiet)
    return Reference(z, points, "NUTS", stats=stats)


# --- distances between q and p ----------------------------------------------------------------

def posterior_kl(q: Distribution, p: Distribution, *, num_draws: int = 4000) -> Tensor:
    """KL(q || p) per data point, ``[N]``: in closed form where torch has one (diagonal and full
    Gaussians are matched through :func:`~zoo.objectives.as_multivariate`; round-off below 0 is
    set to 0), else the Monte-Carlo mean of log q(z) - log p(z) over ``num_draws`` draws from q.
    """
    for pair in ((q, p), (as_multivariate(q), as_multivariate(p))):
        with contextlib.suppress(NotImplementedError):
            return kl_divergence(*pair).clamp(min=0)
    z = q.sample((num_draws,))
    return (q.log_prob(z) - p.log_prob(z)).mean(0)


def _has_closed_form_kl(q: Distribution, p: Distribution) -> bool:
    for pair in ((q, p), (as_multivariate(q), as_multivariate(p))):
        with contextlib.suppress(NotImplementedError):
            kl_divergence(*pair)
            return True
    return False


def moments(distribution: Distribution) -> tuple[Tensor, Tensor]:
    """Mean ``[N, M]`` and covariance ``[N, M, M]`` of a distribution with event shape [M]."""
    if hasattr(distribution, "covariance_matrix"):
        return distribution.mean, distribution.covariance_matrix
    return distribution.mean, torch.diag_embed(distribution.variance)


def sample_moments(z: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``[N, M]`` and covariance ``[N, M, M]`` of draws ``z: [S, N, M]``."""
    centred = z - z.mean(0)
    return z.mean(0), torch.einsum("snm,snk->nmk", centred, centred) / (z.shape[0] - 1)


def gaussian_wasserstein(mean_q: Tensor, cov_q: Tensor, mean_p: Tensor, cov_p: Tensor) -> Tensor:
    """W_2 between N(mean_q, cov_q) and N(mean_p, cov_p), batched: means ``[N, M]``,
    covariances ``[N, M, M]``, result ``[N]`` (computed in float64)."""
    mean_q, cov_q, mean_p, cov_p = (t.double() for t in (mean_q, cov_q, mean_p, cov_p))
    values, vectors = torch.linalg.eigh(cov_p)
    root_p = vectors @ torch.diag_embed(values.clamp(min=0).sqrt()) @ vectors.mT
    cross = torch.linalg.eigvalsh(root_p @ cov_q @ root_p).clamp(min=0).sqrt().sum(-1)
    trace = cov_q.diagonal(dim1=-2, dim2=-1).sum(-1) + cov_p.diagonal(dim1=-2, dim2=-1).sum(-1)
    squared = (mean_q - mean_p).square().sum(-1) + trace - 2 * cross
    return squared.clamp(min=0).sqrt()


def _rms(difference: Tensor) -> Tensor:
    return difference.square().mean(-1).sqrt()


def _moment_errors(q: Distribution | None, draws: GuideDraws, reference: Reference
                   ) -> dict[str, Tensor]:
    """``mean_error``, ``sd_error`` and ``wasserstein`` for every point, ``[N]`` in float64, NaN
    where the reference has no draws. Moments come from the distributions where they are known
    in closed form, else from the draws."""
    p_mean, p_cov = (moments(reference.distribution) if reference.distribution is not None
                     else sample_moments(reference.z.flatten(0, 1)))
    q_mean, q_cov = moments(q) if q is not None else sample_moments(draws.z)
    q_mean, q_cov = q_mean[reference.points], q_cov[reference.points]
    q_sd, p_sd = (cov.diagonal(dim1=-2, dim2=-1).sqrt() for cov in (q_cov, p_cov))
    errors = {"mean_error": _rms(q_mean - p_mean), "sd_error": _rms(q_sd - p_sd),
              "wasserstein": gaussian_wasserstein(q_mean, q_cov, p_mean, p_cov)}
    nan = torch.full((draws.z.shape[1],), math.nan, dtype=torch.float64)
    return {name: nan.clone().index_put_((reference.points.cpu(),), value.double().cpu())
            for name, value in errors.items()}


# --- Pareto-smoothed importance sampling ------------------------------------------------------

def _gpd_fit(x: np.ndarray) -> tuple[float, float]:
    """Shape k and scale sigma of a generalized Pareto distribution fitted to the sorted
    exceedances ``x > 0`` (``[n]``): the empirical-Bayes estimate of Zhang & Stephens (2009),
    a posterior mean over a grid of theta = -k / sigma, with Vehtari et al.'s weakly informative
    prior pulling k towards 0.5 with the weight of 10 observations."""
    n = len(x)
    m = 30 + int(n**0.5)
    theta = 1 - np.sqrt(m / (np.arange(1, m + 1, dtype=float) - 0.5))
    theta /= 3 * x[int(n / 4 + 0.5) - 1]
    theta += 1 / x[-1]
    k = np.log1p(-theta[:, None] * x).mean(axis=1)
    profile = n * (np.log(-(theta / k)) - k - 1)                   # profile log-likelihood
    weights = 1 / np.exp(profile - profile[:, None]).sum(axis=1)
    keep = weights >= 10 * np.finfo(float).eps
    weights, theta = weights[keep], theta[keep]
    weights /= weights.sum()
    theta_mean = np.sum(theta * weights)
    k_mean = np.log1p(-theta_mean * x).mean()
    sigma = -k_mean / theta_mean
    return (n * k_mean + 10 * 0.5) / (n + 10), sigma


def _gpd_quantile(p: np.ndarray, k: float, sigma: float) -> np.ndarray:
    """The generalized Pareto quantile function at ``p`` in (0, 1)."""
    if sigma <= 0:
        return np.full_like(p, np.nan)
    if abs(k) < np.finfo(float).eps:
        return -sigma * np.log1p(-p)
    return sigma * np.expm1(-k * np.log1p(-p)) / k


def pareto_smooth(log_w: np.ndarray) -> tuple[np.ndarray, float]:
    """Pareto-smoothed, normalized log weights ``[S]`` and k-hat for one data point's raw log
    weights ``[S]`` (relative efficiency 1: independent draws).

    The largest M = ceil(min(S / 5, 3 sqrt(S))) weights form the tail; their exceedances over the
    largest weight outside it are fitted by :func:`_gpd_fit`, and replaced by the fitted
    quantiles at (i - 1/2) / M, capped at the largest raw weight. Fewer than five weights above
    the cutoff (all equal, for instance) leave nothing to fit: k-hat is inf, as in ArviZ.
    """
    S = len(log_w)
    x = np.asarray(log_w, dtype=float) - np.max(log_w)
    order = np.argsort(x)
    tail_size = int(np.ceil(min(S / 5, 3 * np.sqrt(S))))
    cutoff = max(x[order[-tail_size - 1]], np.log(np.finfo(float).tiny))
    tail = np.flatnonzero(x > cutoff)
    k = np.inf
    if len(tail) > 4:
        tail = tail[np.argsort(x[tail])]
        k, sigma = _gpd_fit(np.exp(x[tail]) - np.exp(cutoff))
        if np.isfinite(k):
            p = (np.arange(len(tail)) + 0.5) / len(tail)
            x[tail] = np.log(_gpd_quantile(p, k, sigma) + np.exp(cutoff))
            x[x > 0] = 0
    return x - np.logaddexp.reduce(x), float(k)


@dataclass
class ImportanceDiagnostics:
    """Per data point, ``[N]``: ``khat`` (-inf where every weight is equal), ``exact`` (those
    points) and ``ess`` (out of S draws)."""

    khat: Tensor
    exact: Tensor
    ess: Tensor


def importance_diagnostics(log_w: Tensor) -> ImportanceDiagnostics:
    """PSIS k-hat and effective sample size of log weights ``[S, N]``, computed on the CPU (the
    Pareto fit runs in NumPy)."""
    log_w = log_w.detach().cpu()
    tolerance = EQUAL_WEIGHTS_ULPS * torch.finfo(log_w.dtype).eps * log_w.abs().amax(0).clamp(min=1)
    exact = log_w.amax(0) - log_w.amin(0) <= tolerance
    khat = torch.tensor([-math.inf if equal else pareto_smooth(column.double().numpy())[1]
                         for column, equal in zip(log_w.T, exact.tolist(), strict=True)],
                        dtype=torch.float64)
    ess = torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0))
    return ImportanceDiagnostics(khat, exact, ess)


# --- simulation-based calibration -------------------------------------------------------------

@dataclass
class Calibration:
    """Ranks ``[R, M]`` in {0, ..., L} of R simulated z* among L guide draws each, the binned
    counts ``[B, M]`` and the chi-square p-value of each latent dimension ``[M]``."""

    ranks: Tensor
    num_draws: int
    counts: Tensor
    pvalues: Tensor

    @property
    def pvalue(self) -> float:
        """The Bonferroni-corrected p-value over latent dimensions, min(1, M min_m p_m)."""
        return min(1.0, self.pvalues.numel() * self.pvalues.min().item())


def _observed_site(model, *inputs: Tensor) -> str:
    trace = poutine.trace(model).get_trace(*inputs)
    observed = [name for name, site in trace.nodes.items()
                if site["type"] == "sample" and site["is_observed"]]
    if len(observed) != 1:
        raise ZooError(f"simulation-based calibration needs a model with one observed site; "
                       f"this one has {observed or 'none'}")
    return observed[0]


def chi_square_uniformity(counts: Tensor) -> Tensor:
    """p-values of Pearson's chi-square test that counts ``[B, ...]`` come from B equally likely
    bins: P(chi2_{B-1} > sum_b (O_b - E)^2 / E), through the regularized upper incomplete gamma
    function."""
    counts = counts.double()
    expected = counts.sum(0) / counts.shape[0]
    statistic = ((counts - expected) ** 2 / expected).sum(0)
    degrees = torch.tensor(counts.shape[0] - 1, dtype=torch.float64, device=counts.device)
    return torch.special.gammaincc(degrees / 2, statistic / 2)


@torch.no_grad()
def simulation_based_calibration(model, guide, *inputs: Tensor, num_simulations: int = 1000,
                                 num_draws: int = 99, num_bins: int = 10) -> Calibration:
    """SBC of an amortized guide: z* ~ p(z), x ~ p(x | z*), L = ``num_draws`` draws from
    q(z | x), and the rank of z* among them in each latent dimension.

    The model runs unconditioned on copies of ``inputs`` (cycled to ``num_simulations`` rows):
    its observed site is sampled instead, and further inputs (labels) are kept. ``num_bins``
    must divide L + 1, so that every bin holds equally many ranks.
    """
    if (num_draws + 1) % num_bins:
        raise ZooError(f"the number of SBC bins ({num_bins}) must divide the number of possible "
                       f"ranks, draws + 1 = {num_draws + 1}")
    observed = _observed_site(model, *inputs)
    index = torch.arange(num_simulations, device=inputs[0].device) % inputs[0].shape[0]
    template = tuple(tensor[index] for tensor in inputs)
    trace = poutine.trace(poutine.uncondition(model)).get_trace(*template)
    z_true = trace.nodes[LATENT]["value"]                                      # [R, M]
    simulated = (trace.nodes[observed]["value"], *template[1:])
    with pyro.plate(PARTICLE_PLATE, num_draws, dim=-2):
        z = poutine.trace(guide).get_trace(*simulated).nodes[LATENT]["value"]  # [L, R, M]
    ranks = (z < z_true).sum(0)
    bins = ranks * num_bins // (num_draws + 1)
    counts = torch.stack([(bins == b).sum(0) for b in range(num_bins)])
    return Calibration(ranks, num_draws, counts, chi_square_uniformity(counts))


# --- the amortization gap ---------------------------------------------------------------------

class LocalGuide(nn.Module):
    """A guide in the family of an amortized q(z | x) with its own free parameters for each data
    point, started at q's values: the non-amortized q*(z) of Cremer et al. (2018).

    The family is q's distribution class (inside ``Independent`` if q is): its parameters
    (``loc`` and ``scale_tril`` for a ``MultivariateNormal``, else those of ``arg_constraints``)
    are stored unconstrained, ``transform_to(constraint).inv(value)``, one value per data point.
    """

    def __init__(self, q: Distribution):
        super().__init__()
        base, self.event_ndims = ((q.base_dist, q.reinterpreted_batch_ndims)
                                  if isinstance(q, Independent) else (q, 0))
        self.family = type(base)
        names = (("loc", "scale_tril") if isinstance(base, MultivariateNormal)
                 else tuple(base.arg_constraints))
        self.constraints = {name: base.arg_constraints[name] for name in names}
        self.free = nn.ParameterDict({
            name: nn.Parameter(transform_to(constraint).inv(getattr(base, name).detach()).clone())
            for name, constraint in self.constraints.items()})
        self.num_data = q.batch_shape[0]

    @classmethod
    def around(cls, q: Distribution) -> LocalGuide | None:
        """The local guide of q's family, or None when the family cannot be parameterized so."""
        try:
            local = cls(q)
            local.distribution()
        except (NotImplementedError, TypeError, ValueError, AttributeError):
            return None
        return local

    def distribution(self, *inputs: Tensor) -> Distribution:
        """q*(z_n) for each point, batch shape [N] (the inputs are ignored)."""
        parameters = {name: transform_to(constraint)(self.free[name])
                      for name, constraint in self.constraints.items()}
        base = self.family(**parameters)
        return dist.Independent(base, self.event_ndims) if self.event_ndims else base

    def forward(self, *inputs: Tensor) -> None:
        with pyro.plate(DATA_PLATE, self.num_data):
            pyro.sample(LATENT, self.distribution())


@dataclass
class Gaps:
    """Per data point, ``[N]``: log p(x) (``exact`` says whether in closed form), the ELBO of
    the amortized guide and that of the per-point optimum in its family."""

    log_likelihood: Tensor
    elbo: Tensor
    optimal_elbo: Tensor
    exact: bool

    @property
    def approximation(self) -> Tensor:
        """log p(x) - ELBO(q*): what the family cannot do."""
        return self.log_likelihood - self.optimal_elbo

    @property
    def amortization(self) -> Tensor:
        """ELBO(q*) - ELBO(q): what sharing one encoder over all x costs."""
        return self.optimal_elbo - self.elbo


def _fit_local(model, local: LocalGuide, inputs: Sequence[Tensor], loss: Callable[[], Tensor],
               settings: DiagnosticSettings) -> None:
    """Adam on the local parameters, learning rate decayed to 0 on a cosine."""
    optimizer = torch.optim.Adam(local.parameters(), lr=settings.local_lr)
    bar = progress_bar(settings.local_steps, "gaps: per-point guides", quiet=settings.quiet,
                       unit="step")
    with _frozen(model), bar:
        for step in range(settings.local_steps):
            for group in optimizer.param_groups:
                group["lr"] = settings.local_lr * 0.5 * (1 + math.cos(math.pi * step
                                                                       / settings.local_steps))
            optimizer.zero_grad(set_to_none=True)
            loss().backward()
            optimizer.step()
            bar.update()


def amortization_gaps(model, guide, *inputs: Tensor, closed_form: bool = True,
                      settings: DiagnosticSettings = DiagnosticSettings()) -> Gaps | None:
    """The gap decomposition for every point; None when the guide exposes no distribution or
    its family cannot be made local.

    With ``closed_form``, a model with ``posterior`` and ``marginal_log_prob`` and a closed-form
    KL from q to that posterior, everything is exact: ELBO(q) = log p(x) - KL(q || p), and q*
    minimizes that KL directly. Otherwise q* maximizes the Monte-Carlo ELBO
    (``local_particles`` per step), the ELBOs of q and q* are estimated with ``elbo_particles``
    draws, and log p(x) is exact where known, else the larger of the two importance-sampling
    estimates with q and q* as proposals (each a stochastic lower bound; Cremer et al. likewise
    keep the tightest bound they have). q* starts at q, and where its ELBO ends below q's, q
    itself is kept: q belongs to the family, so the amortization gap
    is never negative.
    """
    if not offers(guide, DISTRIBUTION):
        return None
    with torch.no_grad():
        q = guide.distribution(*inputs)
        posterior = (model.posterior(*inputs) if closed_form and offers(model, EXACT_POSTERIOR)
                     else None)
    local = LocalGuide.around(q)
    if local is None:
        return None
    exact = (posterior is not None and offers(model, EXACT_MARGINAL)
             and _has_closed_form_kl(q, posterior))
    if exact:
        _fit_local(model, local, inputs,
                   lambda: posterior_kl(local.distribution(), posterior).sum(), settings)
        with torch.no_grad():                  # in float64, so that tiny gaps survive log p(x)
            log_px = model.marginal_log_prob(*inputs).double()
            elbo = log_px - posterior_kl(q, posterior).double()
            optimal = log_px - posterior_kl(local.distribution(), posterior).double()
    else:
        _fit_local(model, local, inputs, lambda: -draw(
            model, local, *inputs, num_particles=settings.local_particles).log_weights().sum(),
            settings)
        amortized, fitted = (
            log_likelihood(model, proposal, *inputs, num_samples=settings.elbo_particles,
                           quiet=settings.quiet, desc=f"gaps: ELBO and log p(x) with {name}")
            for proposal, name in ((guide, "q"), (local, "q*")))
        elbo, optimal = amortized.elbo, fitted.elbo
        log_px = (model.marginal_log_prob(*inputs).detach() if offers(model, EXACT_MARGINAL)
                  else torch.maximum(amortized.log_likelihood, fitted.log_likelihood))
    return Gaps(log_px.detach(), elbo.detach(), torch.maximum(optimal, elbo).detach(),
                exact=offers(model, EXACT_MARGINAL))


# --- everything at once -----------------------------------------------------------------------

STAGES = ("guide draws and PSIS", "reference posterior", "calibration (SBC)",
          "amortization gaps")
"""The stages of :func:`diagnose`, as its progress bar names them."""


@dataclass
class Diagnostics:
    """What :func:`diagnose` finds: the InferenceData, per-point metrics (``[N]`` float64 on the
    CPU each, NaN where a metric does not apply to a point), the aggregate ``summary`` (only
    the numbers that apply; None for one that is not finite, so that it is valid JSON), and the
    calibration and gaps for the figures."""

    idata: az.InferenceData
    per_point: dict[str, Tensor]
    summary: dict[str, float | int | None]
    calibration: Calibration | None = None
    gaps: Gaps | None = None
    importance: ImportanceDiagnostics | None = None


def diagnose(model, guide, *inputs: Tensor, points: Tensor | None = None,
             settings: DiagnosticSettings = DiagnosticSettings()) -> Diagnostics:
    """Every diagnostic that applies to this model and guide on the points ``inputs`` (the
    model's inputs, first dimension N), labelled ``points`` (default 0, ..., N - 1) in the
    InferenceData. Draws from torch's global generator: seed it first for reproducible
    numbers."""
    points = torch.arange(inputs[0].shape[0]) if points is None else points
    if offers(model, DISCRETE_POSTERIOR):
        return _diagnose_mixture(model, guide, *inputs, points=points, settings=settings)
    with progress_bar(len(STAGES), "diagnostics", quiet=settings.quiet, unit="stage") as stages:
        stages.set_postfix_str(STAGES[0])
        draws = guide_draws(model, guide, *inputs,
                            num_draws=settings.num_chains * settings.num_draws)
        stages.update(), stages.set_postfix_str(STAGES[1])
        reference = reference_posterior(model, *inputs, draws=draws, settings=settings)
        with torch.no_grad():
            q = guide.distribution(*inputs) if offers(guide, DISTRIBUTION) else None
            per_point = _moment_errors(q, draws, reference)
        importance = importance_diagnostics(draws.log_weights)
        stages.update(), stages.set_postfix_str(STAGES[2])
        calibration = simulation_based_calibration(
            model, guide, *inputs, num_simulations=settings.sbc_simulations,
            num_draws=settings.sbc_draws, num_bins=settings.sbc_bins)
        stages.update(), stages.set_postfix_str(STAGES[3])
        gaps = amortization_gaps(model, guide, *inputs, settings=settings)
        stages.update()
    with torch.no_grad():
        if q is not None and reference.distribution is not None:
            per_point["posterior_kl"] = posterior_kl(q, reference.distribution)
        elif gaps is not None:
            per_point["posterior_kl"] = gaps.log_likelihood - gaps.elbo
    per_point["khat"], per_point["ess"] = importance.khat, importance.ess
    if gaps is not None:
        per_point.update(log_likelihood=gaps.log_likelihood, elbo=gaps.elbo,
                         optimal_elbo=gaps.optimal_elbo, approximation_gap=gaps.approximation,
                         amortization_gap=gaps.amortization)
    per_point = _as_reported(per_point)

    summary = summarize(per_point, importance, calibration, num_draws=draws.z.shape[0])
    idata = to_inference_data(model, inputs, points, draws, reference, per_point,
                              num_chains=settings.num_chains)
    return Diagnostics(idata, per_point, summary, calibration, gaps, importance)


def _as_reported(per_point: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-point metrics as they are stored and summarized: float64, on the CPU."""
    return {name: value.detach().double().cpu() for name, value in per_point.items()}


def summarize(per_point: dict[str, Tensor], importance: ImportanceDiagnostics | None,
              calibration: Calibration | None, *, num_draws: int
              ) -> dict[str, float | int | None]:
    """Means over points of the per-point metrics (over the points where they apply), and the
    k-hat, ESS and SBC aggregates, as valid JSON: k-hat aggregates leave out the exact points
    (``khat_exact``) and those without a fitted tail (``khat_unfitted``), and any other number
    that is not finite (an infinite KL, say) is None, which JSON writes as null."""
    summary: dict[str, float | int | None] = {"num_points": len(next(iter(per_point.values())))}
    for name in ("posterior_kl", "mean_error", "sd_error", "wasserstein", "log_likelihood",
                 "elbo", "approximation_gap", "amortization_gap"):
        values = per_point.get(name)
        if values is not None and not values.isnan().all():
            summary[name] = values.nanmean().item()
    if importance is not None:
        unfitted = ~importance.exact & importance.khat.isinf()
        fitted = importance.khat[~importance.exact & ~unfitted]
        if fitted.numel():
            summary["khat_max"] = fitted.max().item()
            summary["khat_mean"] = fitted.mean().item()
        summary["khat_exact"] = int(importance.exact.sum())
        summary["khat_unfitted"] = int(unfitted.sum())
        summary["ess_mean"] = importance.ess.mean().item()
        summary["num_draws"] = num_draws
    if calibration is not None:
        summary["sbc_pvalue"] = calibration.pvalue
    return {name: None if isinstance(value, float) and not math.isfinite(value) else value
            for name, value in summary.items()}


def _diagnose_mixture(model, guide, *inputs: Tensor, points: Tensor,
                      settings: DiagnosticSettings) -> Diagnostics:
    """Discrete z: the responsibilities r_nk = p(z_n = k | x_n) against the guide's
    ``responsibilities(x)``; a guide without them leaves z to exact enumeration in the model, so
    its q is p(z | x) itself. KL(q || p) is exact; the family of all categorical distributions
    contains p(z | x), so the approximation gap is 0 and the whole gap log p(x) - ELBO =
    KL(q || p) is amortization. PSIS and SBC are left out for enumerated assignments."""
    x = inputs[0]
    with torch.no_grad():
        exact = Categorical(probs=model.responsibilities(x))
        q = (Categorical(probs=guide.responsibilities(x)) if offers(guide, DISCRETE_POSTERIOR)
             else exact)
        S, C = settings.num_draws, settings.num_chains
        z_q, z_p = q.sample((C * S,)), exact.sample((C * S,))                  # [C S, N]
        kl = kl_divergence(q, exact).double()
        per_point: dict[str, Tensor] = {"posterior_kl": kl}
        log_q = q.log_prob(z_q)
        log_joint = None
        if offers(model, EXACT_MARGINAL):
            log_px = model.marginal_log_prob(x).double()
            log_joint = exact.log_prob(z_q) + log_px.to(log_q)
            per_point.update(log_likelihood=log_px, elbo=log_px - kl, optimal_elbo=log_px,
                             approximation_gap=torch.zeros_like(kl), amortization_gap=kl)
    per_point = _as_reported(per_point)
    if log_joint is None:
        log_joint = torch.full_like(log_q, math.nan)
    draws = GuideDraws(z_q, log_joint, log_q)
    reference = Reference(z_p.reshape(C, S, -1), torch.arange(len(points)), "closed form",
                          distribution=exact)
    summary = summarize(per_point, None, None, num_draws=C * S)
    gaps = (Gaps(per_point["log_likelihood"], per_point["elbo"], per_point["optimal_elbo"],
                 exact=True) if "log_likelihood" in per_point else None)
    idata = to_inference_data(model, inputs, points, draws, reference, per_point, num_chains=C)
    return Diagnostics(idata, per_point, summary, gaps=gaps)


# --- ArviZ ------------------------------------------------------------------------------------

def _global_parameters(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's parameters in their constrained form (``sigma``, not ``sigma_unconstrained``),
    when they number at most ``MAX_GLOBALS`` in all."""
    named = dict(model.named_parameters())
    if sum(parameter.numel() for parameter in named.values()) > MAX_GLOBALS:
        return {}
    values = {}
    for name in named:
        name = name.removesuffix("_unconstrained")
        values[name] = operator.attrgetter(name)(model).detach().cpu().numpy()
    return values


def _chains(tensor: Tensor, num_chains: int) -> np.ndarray:
    """``[C S, ...]`` as ``[C, S, ...]`` in NumPy."""
    return tensor.detach().cpu().reshape(num_chains, -1, *tensor.shape[1:]).numpy()


def to_inference_data(model, inputs: Sequence[Tensor], points: Tensor, draws: GuideDraws,
                      reference: Reference, per_point: dict[str, Tensor], *,
                      num_chains: int) -> az.InferenceData:
    """The InferenceData described in the module docstring."""
    obs = points.cpu().numpy()
    z = _chains(draws.z, num_chains)
    latent_dims = ["obs", "latent"] if z.ndim == 4 else ["obs"]
    coords = {"obs": obs, "latent": np.arange(z.shape[3])} if z.ndim == 4 else {"obs": obs}
    C, S = z.shape[:2]
    parameters = {name: np.broadcast_to(value, (C, S, *value.shape))
                  for name, value in _global_parameters(model).items()}
    posterior = az.dict_to_dataset({LATENT: z, **parameters}, library=pyro,
                                   coords=coords, dims={LATENT: latent_dims})
    reference_coords = {**coords, "obs": obs[reference.points.cpu().numpy()]}
    reference_posterior = az.dict_to_dataset(
        {LATENT: reference.z.cpu().numpy()}, library=pyro, coords=reference_coords,
        dims={LATENT: latent_dims}, attrs={"method": reference.method, **reference.stats})
    observed = az.dict_to_dataset({"x": inputs[0].cpu().numpy()}, coords={"obs": obs},
                                  dims={"x": ["obs", "feature"]}, default_dims=[])
    groups = {"posterior": posterior, "reference_posterior": reference_posterior,
              "observed_data": observed,
              "sample_stats": az.dict_to_dataset(
                  {"log_joint": _chains(draws.log_joint, num_chains),
                   "log_q": _chains(draws.log_q, num_chains)},
                  library=pyro, coords={"obs": obs}, dims={"log_joint": ["obs"],
                                                           "log_q": ["obs"]}),
              "metrics": xr.Dataset({name: ("obs", value.cpu().numpy())
                                     for name, value in per_point.items()},
                                    coords={"obs": obs})}
    if len(inputs) > 1:
        groups["constant_data"] = az.dict_to_dataset(
            {"y": inputs[1].cpu().numpy()}, coords={"obs": obs}, dims={"y": ["obs"]},
            default_dims=[])
    return az.InferenceData(**groups)


# --- figures ----------------------------------------------------------------------------------

Q_STYLE = {"color": "tab:red"}
P_STYLE = {"color": "black"}
TITLE_SIZE, LABEL_SIZE, TICK_SIZE = 10, 9, 8
"""Font sizes of every diagnostics panel (ArviZ scales its own with the figure)."""

FIGURES = ("diagnostics-marginals", "diagnostics-pair", "diagnostics-forest", "diagnostics-khat",
           "diagnostics-sbc", "diagnostics-gaps")
"""The figures :func:`draw_figures` can draw, by file name, in reading order."""

ZERO_GAP = 1e-12
"""Gaps below this many nats count as zero: the guide is the exact posterior."""


def _legible(ax) -> None:
    ax.tick_params(labelsize=TICK_SIZE)
    ax.xaxis.label.set_size(LABEL_SIZE)
    ax.yaxis.label.set_size(LABEL_SIZE)
    ax.title.set_size(TITLE_SIZE)


def _bars(ax, q: np.ndarray, p: np.ndarray, p_label: str, num_values: int) -> None:
    """Frequencies of the values 0, ..., ``num_values`` - 1 of a discrete z: q's bars (red)
    beside the reference's."""
    values = np.arange(num_values)
    for draws, offset, style, label in ((q, -0.2, Q_STYLE, "q(z|x)"), (p, 0.2, P_STYLE, p_label)):
        ax.bar(values + offset, np.bincount(draws, minlength=len(values)) / len(draws),
               width=0.4, label=label, **style)
    ax.set_xticks(values)
    ax.set_xlabel("component z")
    ax.set_ylabel("probability")
    ax.legend(fontsize="small")


def plot_marginals(idata: az.InferenceData, path: str | Path, *, max_points: int = 3,
                   max_dims: int = 3) -> Path:
    """Marginal densities of q(z_m | x_n) (red) over those of the reference (black), for the
    first few points (rows) and latent dimensions (columns), with ArviZ's ``plot_dist``; for a
    discrete z, the two distributions' bars side by side, one point beside the other."""
    reference = idata.reference_posterior[LATENT]
    method = idata.reference_posterior.attrs["method"]
    obs = reference.obs.values[:max_points]
    latent = reference.latent.values[:max_dims] if "latent" in reference.dims else [None]
    discrete = np.issubdtype(reference.dtype, np.integer)
    num_values = (int(max(idata.posterior[LATENT].max(), reference.max())) + 1 if discrete
                  else 0)
    shape = (1, len(obs)) if discrete else (len(obs), len(latent))
    figure = Figure(figsize=(3 * shape[1], 2.4 * shape[0] + 0.2), layout="constrained")
    axes = figure.subplots(*shape, squeeze=False)
    if discrete:              # the points side by side: axes[point, 0] as for a continuous z
        axes = axes.T
    for row, n in enumerate(obs):
        for column, m in enumerate(latent):
            where = {"obs": n} if m is None else {"obs": n, "latent": m}
            ax = axes[row, column]
            q, p = (group[LATENT].sel(where).values.ravel()
                    for group in (idata.posterior, idata.reference_posterior))
            if discrete:
                _bars(ax, q, p, method, num_values)
            else:
                az.plot_dist(q, ax=ax, label="q(z|x)", **Q_STYLE)
                az.plot_dist(p, ax=ax, label=method, **P_STYLE)
                ax.set_xlabel(f"z{m + 1}" if m is not None else "z")
            ax.set_title(f"point {n}" + ("" if m is None else f", z{m + 1}"))
            if row or column:
                ax.get_legend().remove()
            _legible(ax)
    return plots.save_figure(figure, path)


def plot_pairs(idata: az.InferenceData, path: str | Path) -> Path | None:
    """Joint draws of (z1, z2) from q (red) and the reference (black) for the first point, with
    the reference mean as ``plot_pair``'s reference value; None when M < 2."""
    reference = idata.reference_posterior[LATENT]
    if "latent" not in reference.dims or reference.sizes["latent"] < 2:
        return None
    coords = {"obs": [reference.obs.values[0]], "latent": [0, 1]}
    mean = reference.sel(coords).mean(("chain", "draw")).values
    figure = Figure(figsize=(4.5, 4.5))
    ax = figure.subplots()
    az.plot_pair(idata, group="reference_posterior", var_names=[LATENT], coords=coords, ax=ax,
                 scatter_kwargs={**P_STYLE, "alpha": 0.3})
    az.plot_pair(idata, var_names=[LATENT], coords=coords, ax=ax,
                 scatter_kwargs={**Q_STYLE, "alpha": 0.3},
                 reference_values={LATENT: mean})
    ax.set_xlabel("z1")
    ax.set_ylabel("z2")
    ax.set_title(f"point {coords['obs'][0]}: q (red), {idata.reference_posterior.attrs['method']}"
                 f" (black)")
    _legible(ax)
    return plots.save_figure(figure, path)


def _point_label(text: str) -> str:
    """ArviZ's ``z[n, m]`` (or ``[n, m]``, ``z[n]``) as ``point n, zm+1``."""
    match = re.search(r"\[(\d+)(?:, (\d+))?\]", text)
    if match is None:
        return text
    n, m = match.groups()
    return f"point {n}" + ("" if m is None else f", z{int(m) + 1}")


def plot_forest(idata: az.InferenceData, path: str | Path, *, max_points: int = 6,
                max_dims: int = 4) -> Path:
    """Means and 94% HDIs of q and the reference side by side, with ArviZ's ``plot_forest``."""
    reference = idata.reference_posterior
    coords = {"obs": reference.obs.values[:max_points]}
    if "latent" in reference.dims:
        coords["latent"] = reference.latent.values[:max_dims]
    figure = Figure(figsize=(6, 1 + 0.45 * np.prod([len(v) for v in coords.values()])))
    ax = figure.subplots()
    az.plot_forest([idata.posterior[[LATENT]], reference[[LATENT]]],
                   model_names=["q(z|x)", reference.attrs["method"]], var_names=[LATENT],
                   coords=coords, combined=True, hdi_prob=0.94, ax=ax,
                   colors=[Q_STYLE["color"], P_STYLE["color"]])
    ax.set_yticks(ax.get_yticks(), [_point_label(label.get_text())
                                    for label in ax.get_yticklabels()])
    ax.set_title(f"means and 94% HDIs of z: q(z|x) (red), {reference.attrs['method']} (black)")
    ax.set_xlabel("z")
    _legible(ax)
    return plots.save_figure(figure, path)


def plot_khat(khat: Tensor, exact: Tensor, obs: np.ndarray, path: str | Path) -> Path:
    """PSIS k-hat per point with ArviZ's ``plot_khat`` and the 0.5 / 0.7 thresholds, labelled;
    points whose weights are all equal (exact q) have no tail and are listed in the title
    instead."""
    values = khat.cpu().numpy().copy()
    values[exact.cpu().numpy()] = np.nan
    pareto_k = xr.DataArray(values, dims=["obs"], coords={"obs": obs})
    figure = Figure(figsize=(6, 3.5))
    ax = figure.subplots()
    az.plot_khat(az.ELPDData(data=[pareto_k, KHAT_USABLE], index=["pareto_k", "good_k"]),
                 ax=ax, show_hlines=False)
    ax.axhline(KHAT_GOOD, color="tab:orange", linestyle=":",
               label=f"{KHAT_GOOD}: good below")
    ax.axhline(KHAT_USABLE, color="tab:red", linestyle="--",
               label=f"{KHAT_USABLE}: unreliable above")
    ax.legend(fontsize="small")
    ax.set_xticks(obs)
    ax.set_xlabel("data point")
    ax.set_ylabel("k-hat")
    exact_count = int(exact.sum())
    ax.set_title("PSIS k-hat of log p(x, z) - log q(z | x)"
                 + (f"; {exact_count} points exact (equal weights)" if exact_count else ""))
    _legible(ax)
    return plots.save_figure(figure, path)


def plot_ranks(calibration: Calibration, path: str | Path, *, max_dims: int = 8,
               columns: int = 4) -> Path:
    """SBC rank histograms per latent dimension, ``columns`` to a row, with the expected count
    and the band that holds 99% of the counts of a uniform rank (normal approximation to the
    binomial)."""
    counts = calibration.counts[:, :max_dims].double().cpu()
    B, M = counts.shape
    R = calibration.ranks.shape[0]
    expected = R / B
    band = 2.576 * math.sqrt(R * (1 / B) * (1 - 1 / B))
    rows, width = math.ceil(M / columns), min(M, columns)
    figure = Figure(figsize=(2.8 * width, 2.4 * rows + 0.4), layout="constrained")
    axes = figure.subplots(rows, width, squeeze=False).ravel()
    for m, ax in enumerate(axes):
        if m >= M:
            ax.set_axis_off()
            continue
        ax.axhspan(expected - band, expected + band, color="grey", alpha=0.25)
        ax.axhline(expected, color="black", linewidth=1)
        ax.bar(np.arange(B), counts[:, m].numpy(), width=0.9, color=Q_STYLE["color"])
        ax.set_xticks(np.arange(B))
        ax.set_title(f"z{m + 1}: p = {calibration.pvalues[m].item():.3g}")
        ax.set_xlabel(f"rank bin (L = {calibration.num_draws})")
        _legible(ax)
    figure.suptitle(f"simulation-based calibration, {R} simulations")
    return plots.save_figure(figure, path)


def plot_gaps(gaps: Gaps, obs: np.ndarray, path: str | Path) -> Path | None:
    """log p(x) - ELBO per point as stacked bars: approximation gap below, amortization above;
    None when every gap is zero (see :func:`omitted_figures`)."""
    approximation = gaps.approximation.double().cpu().numpy()
    amortization = gaps.amortization.double().cpu().numpy()
    if max(np.abs(approximation).max(), np.abs(amortization).max()) < ZERO_GAP:
        return None
    figure = Figure(figsize=(max(4, 0.35 * len(obs) + 2), 3.5))
    ax = figure.subplots()
    position = np.arange(len(obs))
    ax.bar(position, approximation, color="tab:blue", label="approximation gap")
    ax.bar(position, amortization, bottom=approximation, color="tab:orange",
           label="amortization gap")
    ax.set_xticks(position, [str(n) for n in obs], fontsize="small")
    ax.set_xlabel("data point")
    ax.set_ylabel("nats")
    ax.set_title("log p(x) - ELBO" + ("" if gaps.exact else " (log p(x) importance-sampled)"))
    ax.legend()
    return plots.save_figure(figure, path)


def omitted_figures(summary: dict[str, float | int | None]) -> list[str]:
    """Sentences for the report about figures left out because they would be empty."""
    gaps = [summary.get(name) for name in ("approximation_gap", "amortization_gap")]
    if all(gap is not None and abs(gap) < ZERO_GAP for gap in gaps):
        return ["No gaps figure: log p(x) - ELBO is 0 at every point, because q(z|x) is the "
                "exact posterior."]
    return []


def draw_figures(diagnostics: Diagnostics, folder: Path, *, quiet: bool = False) -> list[Path]:
    """Every diagnostics figure that applies, into ``folder``, in the order of ``FIGURES``,
    with a progress bar unless ``quiet``."""
    idata, obs = diagnostics.idata, diagnostics.idata.observed_data.obs.values
    marginals, pair, forest, khat, sbc, gaps = (folder / f"{name}.png" for name in FIGURES)
    draws = [partial(plot_marginals, idata, marginals), partial(plot_pairs, idata, pair)]
    if "latent" in idata.posterior.dims:
        draws.append(partial(plot_forest, idata, forest))
    if diagnostics.importance is not None:
        draws.append(partial(plot_khat, diagnostics.importance.khat,
                             diagnostics.importance.exact, obs, khat))
    if diagnostics.calibration is not None:
        draws.append(partial(plot_ranks, diagnostics.calibration, sbc))
    if diagnostics.gaps is not None:
        draws.append(partial(plot_gaps, diagnostics.gaps, obs, gaps))
    figures = []
    with progress_bar(len(draws), "diagnostics figures", quiet=quiet, unit="figure") as bar:
        for draw_one in draws:
            figures.append(draw_one())
            bar.update()
    return [figure for figure in figures if figure is not None]


# --- a trained run ----------------------------------------------------------------------------

def write_summary(per_point: dict[str, Tensor], obs: np.ndarray, path: Path) -> Path:
    """One row per data point, one column per metric (empty where it does not apply)."""
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["obs", *per_point])
        for row, n in enumerate(obs):
            values = [per_point[name][row].item() for name in per_point]
            writer.writerow([int(n), *("" if math.isnan(value) else repr(value)
                                       for value in values)])
    return path


NOTES = (
    "KL, mean and sd errors and the Wasserstein distance compare q(z|x) with the reference "
    "posterior per point (means over points here; per point in summary.csv).",
    "PSIS k-hat < 0.5: q is a good importance proposal for p; 0.5-0.7 usable; > 0.7 unreliable "
    "(q misses posterior mass). Points whose weights are all equal have an exact q; points "
    "with fewer than five weights above the tail's cutoff have no fitted tail (khat_unfitted) "
    "and are left out of khat_max and khat_mean. k-hat measures the shape of the weights' "
    "tail, not its size, so read it with the ESS.",
    "SBC: the p-value of a chi-square test that the ranks of prior draws among guide draws are "
    "uniform (Bonferroni over latent dimensions); small values mean q is miscalibrated.",
    "log p(x) - ELBO = approximation gap (best member of the family for that x) + amortization "
    "gap (the cost of one shared encoder).",
)


def diagnose_run(run_dir: str | os.PathLike, *, num_points: int = 20,
                 settings: DiagnosticSettings = DiagnosticSettings(), quiet: bool = False
                 ) -> dict[str, float | int | None]:
    """Diagnose a trained run on its first ``num_points`` test points (training points without
    a test split) and write ``diagnostics.nc``, ``summary.csv``, the figures and ``report.html``
    into the run folder. Returns the aggregate summary (see :class:`Diagnostics`). ``quiet``
    hides the progress bars."""
    if num_points < 1:
        raise ZooError(f"--points must be at least 1; got {num_points}")
    started = time.perf_counter()
    run_dir = Path(run_dir)
    experiment = load_run(run_dir)
    seed_everything(experiment.settings.seed)
    experiment.model.eval(), experiment.guide.eval()
    split = "test" if experiment.inputs("test") is not None else "train"
    inputs = tuple(tensor[:num_points] for tensor in experiment.inputs(split))
    diagnostics = diagnose(experiment.model, experiment.guide, *inputs,
                           settings=dataclasses.replace(settings, quiet=quiet))

    diagnostics.idata.to_netcdf(str(run_dir / NETCDF))
    obs = diagnostics.idata.observed_data.obs.values
    write_summary(diagnostics.per_point, obs, run_dir / SUMMARY)
    folder = run_dir / runs.FIGURES
    figures = draw_figures(diagnostics, folder, quiet=quiet)
    with torch.no_grad():
        figures += [experiment.entry.plots[kind](experiment, folder / f"{kind}.png")
                    for kind in DIAGNOSTIC_PLOTS if kind in experiment.entry.plots]
    seconds = time.perf_counter() - started
    config = experiment.config
    write_report(run_dir, f"zoo diagnose: {run_dir.name}", [Section(
        title=f"diagnostics: {config['model']} with the {config['guide']} guide",
        description=f"q(z|x) against the {diagnostics.idata.reference_posterior.attrs['method']} "
                    f"posterior on {len(obs)} {split} points",
        metrics={f"mean over {len(obs)} {split} points": {
            name: value for name, value in diagnostics.summary.items() if value is not None}},
        totals={"ess_mean": diagnostics.summary["num_draws"]} if "num_draws" in diagnostics.summary
        else {},
        figures=figures, notes=[*NOTES, *_run_notes(diagnostics),
                                *omitted_figures(diagnostics.summary),
                                f"{seconds:.1f} s; draws and per-point metrics in {NETCDF} "
                                f"and {SUMMARY}."])])
    return diagnostics.summary


def _run_notes(diagnostics: Diagnostics) -> list[str]:
    """How the reference and log p(x) were obtained, for the report."""
    reference = diagnostics.idata.reference_posterior
    notes = []
    if reference.attrs["method"] == "NUTS":
        notes.append(f"Reference: NUTS on the first {reference.sizes['obs']} points, "
                     f"{reference.sizes['chain']} chains of {reference.sizes['draw']} draws, "
                     f"{reference.attrs['divergences']:.0f} divergences, mean acceptance "
                     f"{reference.attrs['acceptance']:.2f}.")
    if diagnostics.gaps is not None and not diagnostics.gaps.exact:
        notes.append("log p(x) is importance-sampled (the larger of the estimates with q and "
                     "q* as proposals); importance sampling underestimates log p(x) on average, "
                     "so the approximation gap tends to be underestimated.")
    infinite = [name for name, value in diagnostics.summary.items() if value is None]
    if infinite:
        notes.append(f"Not finite, so left out of the table: {', '.join(infinite)}.")
    return notes


# --- gradient signal-to-noise -----------------------------------------------------------------
@dataclass(frozen=True)
class GradientSNR:
    """Signal-to-noise ratios of a stochastic gradient, one per scalar parameter.

    ``encoder``: the guide's parameters, ``decoder``: the model's, each a flat tensor of
    SNR_i = |mean_r g_ri| / sd_r g_ri over R repeated estimates g_r on the same minibatch.
    Parameters whose gradient has no spread (always zero, or exact) are left out.
    """

    encoder: torch.Tensor
    decoder: torch.Tensor

    def summary(self) -> dict[str, float]:
        """Mean and median SNR of each group (NaN for a group without parameters)."""
        result = {}
        for group in ("encoder", "decoder"):
            snr = getattr(self, group)
            empty = snr.numel() == 0
            result[f"{group}_snr_mean"] = float("nan") if empty else snr.mean().item()
            result[f"{group}_snr_median"] = float("nan") if empty else snr.median().item()
        return result


def gradient_snr(model, guide, objective, data: Sequence[torch.Tensor], repeats: int = 100
                 ) -> GradientSNR:
    """The gradient's signal-to-noise ratio per parameter (Rainforth et al. 2018),

        SNR_i = |E[g_i]| / sd(g_i),

    estimated from ``repeats`` independent draws of ``objective``'s gradient on the same
    minibatch ``data`` (the tensors model and guide are called with). For IWAE the encoder's
    SNR falls like 1 / sqrt(K) as K grows while the decoder's rises like sqrt(K); MIWAE,
    CIWAE, PIWAE and DReG keep the encoder's up. Parameters are left where they are.
    """
    if repeats < 2:
        raise ZooError(f"gradient SNR needs at least 2 repeats to estimate a spread; got {repeats}")
    groups = {"encoder": list(guide.parameters()), "decoder": list(model.parameters())}
    draws: dict[str, list[torch.Tensor]] = {name: [] for name in groups}
    for _ in range(repeats):
        loss = objective.differentiable_loss(model, guide, *data)
        parameters = groups["encoder"] + groups["decoder"]
        gradients = torch.autograd.grad(loss, parameters, allow_unused=True)
        start = 0
        for name, members in groups.items():
            flat = [(g if g is not None else torch.zeros_like(p)).reshape(-1)
                    for g, p in zip(gradients[start:start + len(members)], members, strict=True)]
            draws[name].append(torch.cat(flat) if flat else torch.zeros(0))
            start += len(members)
    result = {}
    for name, rows in draws.items():
        stacked = torch.stack(rows)
        mean, sd = stacked.mean(0), stacked.std(0)
        keep = sd > 0
        result[name] = mean[keep].abs() / sd[keep]
    return GradientSNR(**result)
