"""Per-data-point evaluation: the ELBO, the importance-sampled log-likelihood, and the exact
quantities a model knows in closed form.

Importance sampling with the guide as proposal estimates the marginal likelihood of each x_n,

    log p(x_n) ~= log (1/K) sum_k w_kn,    w_kn = p(x_n, z_kn) / q(z_kn | x_n),  z_kn ~ q(z | x_n),

a stochastic lower bound (the IWAE bound L_K) that tightens as K grows. The ELBO of the same
draws is the mean of log w_kn over k, and the effective sample size of the normalized weights,
ESS_n = (sum_k w_kn)^2 / sum_k w_kn^2, tells how well q covers the posterior (K is perfect).
:func:`average_loss` is an objective's loss per data point over a data set, as training
reports it for the test set and for its convergence check.

A model and its guide declare the ground truth they offer (:mod:`zoo.contract`): an exact
marginal ``marginal_log_prob(x) -> [N]``, an exact posterior ``posterior(x)``, a closed-form
maximum-likelihood solution ``maximum_likelihood(x)``, and a guide q(z | x) as a distribution
``guide.distribution(x)``. A model with a discrete posterior (a mixture with enumerated
assignments) is evaluated exactly by :func:`discrete_metrics` instead of importance sampling.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from zoo import distributed
from zoo.contract import (
    DISCRETE_POSTERIOR,
    DISTRIBUTION,
    EXACT_MARGINAL,
    EXACT_POSTERIOR,
    MAXIMUM_LIKELIHOOD,
    offers,
)
from zoo.errors import ZooError
from zoo.objectives import log_weights, posterior_kl
from zoo.progress import progress_bar


@dataclass(frozen=True)
class ImportanceEstimate:
    """Per-data-point results of importance sampling, each of shape ``[N]``."""

    log_likelihood: torch.Tensor
    elbo: torch.Tensor
    ess: torch.Tensor


def ess_of_sums(log_sum_w: torch.Tensor, log_sum_w2: torch.Tensor) -> torch.Tensor:
    """The importance-sampling effective sample size (sum_s w_s)^2 / sum_s w_s^2 from
    log sum_s w_s and log sum_s w_s^2 (any shape, elementwise), out of S draws."""
    return torch.exp(2 * log_sum_w - log_sum_w2)


def effective_sample_size(log_w: torch.Tensor) -> torch.Tensor:
    """The effective sample size of log weights ``[S, N]`` per data point, ``[N]``."""
    return ess_of_sums(torch.logsumexp(log_w, 0), torch.logsumexp(2 * log_w, 0))


@contextlib.contextmanager
def _chunk_stream(seed: int | None, start: int, device: torch.device) -> Iterator[None]:
    """The random stream of the chunk of data points from row ``start``: its own, seeded by
    (``seed``, ``start``) through NumPy's ``SeedSequence``; the current one when ``seed`` is
    None."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(int(np.random.SeedSequence([seed, start]).generate_state(1)[0]))
        yield


@torch.no_grad()
def log_likelihood(model, guide, *data: torch.Tensor, num_samples: int = 1000,
                   max_elements: int = 30_000_000, seed: int | None = None,
                   quiet: bool = False, desc: str = "importance sampling"
                   ) -> ImportanceEstimate:
    """Importance-sampled log p(x_n) for each data point, with the ELBO and ESS of the draws.

    ``data`` are the model's inputs, first dimension N. The work is chunked over data points and
    particles so that at most about ``max_elements`` numbers of the size of x exist at once
    (particles x data points x D; 30 million, about 120 MB per such tensor, bounds the memory
    of an MNIST VAE near 1 GB whatever N and K); the chunks are combined exactly by
    log-sum-exp, so the result does not depend on the chunking. A progress bar ``desc``
    counts the draws when the work lasts (:mod:`zoo.progress`) unless ``quiet``.

    With a ``seed``, each chunk of data points draws from its own random stream (seeded by
    ``seed`` and its first row), so the result does not depend on the order of the chunks
    either: under several processes (:mod:`zoo.distributed`) each takes every N-th chunk and one
    all-reduce gathers the columns, with the same result as one process. Without a seed the
    chunks draw in turn from the current stream, in one process.
    """
    if num_samples < 1:
        raise ZooError(f"the importance-sampled log-likelihood needs at least 1 sample per data "
                       f"point (--particles of zoo evaluate); got num_samples = {num_samples}")
    num_data, point_size = data[0].shape[0], max(1, data[0][0].numel())
    pairs = max(1, max_elements // point_size)
    rows = max(1, min(num_data, pairs // num_samples))
    particles = max(1, min(num_samples, pairs // rows))
    columns = data[0].new_zeros(3, num_data)  # log p(x_n), ELBO_n, ESS_n
    starts = range(0, num_data, rows)
    mine = starts if seed is None else distributed.mine(starts)
    my_points = sum(min(rows, num_data - start) for start in mine)
    bar = progress_bar(my_points * num_samples, desc, quiet=quiet, unit="draw", unit_scale=True)
    for start in mine:
        chunk = tuple(tensor[start:start + rows] for tensor in data)
        log_sum_w, log_sum_w2, sum_log_w = None, None, 0.0
        with _chunk_stream(seed, start, data[0].device):
            for done in range(0, num_samples, particles):
                log_w = log_weights(model, guide, *chunk,
                                    num_particles=min(particles, num_samples - done))
                parts = (torch.logsumexp(log_w, 0), torch.logsumexp(2 * log_w, 0))
                if log_sum_w is None:
                    log_sum_w, log_sum_w2 = parts
                else:
                    log_sum_w = torch.logaddexp(log_sum_w, parts[0])
                    log_sum_w2 = torch.logaddexp(log_sum_w2, parts[1])
                sum_log_w = sum_log_w + log_w.sum(0)
                bar.update(log_w.numel())
        columns[:, start:start + rows] = torch.stack([
            log_sum_w - math.log(num_samples), sum_log_w / num_samples,
            ess_of_sums(log_sum_w, log_sum_w2)])
    bar.close()
    if seed is not None:
        distributed.sum_over_ranks(columns)
    log_px, elbo, ess = columns
    return ImportanceEstimate(log_likelihood=log_px, elbo=elbo, ess=ess)


@torch.no_grad()
def average_loss(objective, model, guide, data: Sequence[torch.Tensor], *, seed: int,
                 chunk_size: int = 4096) -> float:
    """The objective's loss per data point over ``data``, under a private random stream seeded
    with ``seed``, so evaluating never changes what training draws next."""
    devices = [data[0].device] if data[0].device.type == "cuda" else []
    was_training = model.training, guide.training
    model.eval(), guide.eval()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        total = sum(objective.differentiable_loss(
                        model, guide, *(tensor[start:start + chunk_size] for tensor in data))
                    for start in range(0, data[0].shape[0], chunk_size))
    model.train(was_training[0]), guide.train(was_training[1])
    return float(total) / data[0].shape[0]


ACTIVE_UNIT_THRESHOLD = 0.01


def active_units(posterior_means: torch.Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    """The number of active latent dimensions (Burda et al. 2015): dimension d is active when
    the variance over data points of E_q[z_d | x_n] exceeds ``threshold``.

    ``posterior_means``: ``[N, M]``. A dimension that is inactive carries no information about x
    (its posterior equals its prior for every x): posterior collapse.
    """
    if posterior_means.shape[0] < 2:
        raise ZooError("active units need at least two data points")
    return int((posterior_means.var(0) > threshold).sum())


@torch.no_grad()
def evaluate(model, guide, *data: torch.Tensor, num_samples: int = 1000,
             train_x: torch.Tensor | None = None, seed: int | None = None,
             quiet: bool = False, desc: str = "evaluating") -> dict[str, float]:
    """Per-data-point means, in nats, of every metric that applies to this model and guide.

    Always ``elbo`` and ``log_likelihood`` (importance-sampled with ``num_samples`` draws) and
    ``ess`` (mean effective sample size); ``exact_log_likelihood`` when the model has a closed-form
    marginal; ``mle_log_likelihood`` (the closed-form optimum fitted on ``train_x``, evaluated on
    ``data``) when it has a closed-form maximum-likelihood solution; ``posterior_kl``, the mean
    KL(q(z|x) || p(z|x)), when the model has a closed-form posterior and the guide exposes q;
    ``active_units`` when the guide exposes q (see :func:`active_units`). ``seed`` gives the
    importance sampling its own streams (see :func:`log_likelihood`); it shows a progress bar
    ``desc`` when it lasts, unless ``quiet``.
    """
    x = data[0]
    if offers(model, DISCRETE_POSTERIOR):
        metrics = discrete_metrics(model, guide, x)
    else:
        estimate = log_likelihood(model, guide, *data, num_samples=num_samples, seed=seed,
                                  quiet=quiet, desc=desc)
        metrics = {"elbo": estimate.elbo.mean().item(),
                   "log_likelihood": estimate.log_likelihood.mean().item(),
                   "ess": estimate.ess.mean().item()}
    if offers(guide, DISTRIBUTION):
        metrics["active_units"] = active_units(guide.distribution(*data).mean)
    metrics.update(closed_form_metrics(model, guide, x, train_x))
    return metrics


@torch.no_grad()
def closed_form_metrics(model, guide, x: torch.Tensor, train_x: torch.Tensor | None = None
                        ) -> dict[str, float]:
    """``exact_log_likelihood``, ``mle_log_likelihood`` and ``posterior_kl`` of
    :func:`evaluate`, where model and guide offer them, computed in float64 on float64 copies of
    model, guide and data.

    Why float64: these are read as differences (the gap between the optimum's log-likelihood and
    the model's; a KL between two narrow Gaussians), and each is a difference of large terms. In
    PPCA's marginal, (|r|^2 - |u|^2) / sigma^2 cancels all but the noise's share of |r|^2; on a
    table whose noise variance is 1e-4 of its loadings' that multiplies float32's rounding by
    about 1e4, enough to put a trained model 1e-3 nats per point above the maximum likelihood.
    """
    exact_marginal = offers(model, EXACT_MARGINAL)
    optimum = offers(model, MAXIMUM_LIKELIHOOD) and train_x is not None
    exact_kl = offers(model, EXACT_POSTERIOR) and offers(guide, DISTRIBUTION)
    if not (exact_marginal or optimum or exact_kl):
        return {}
    model, guide = copy.deepcopy((model, guide))     # together: shared parameters stay shared
    model, guide, x = model.double(), guide.double(), x.double()
    metrics = {}
    if exact_marginal:
        metrics["exact_log_likelihood"] = model.marginal_log_prob(x).mean().item()
    if optimum:
        best = model.maximum_likelihood(train_x.double())
        metrics["mle_log_likelihood"] = best.marginal_log_prob(x).mean().item()
    if exact_kl:
        kl_per_point = posterior_kl(guide.distribution(x), model.posterior(x))
        metrics["posterior_kl"] = kl_per_point.mean().item()
    return metrics


@torch.no_grad()
def discrete_metrics(model, guide, x: torch.Tensor) -> dict[str, float]:
    """Exact per-data-point metrics of a model with a discrete posterior and an exact marginal.

    ``log_likelihood``: mean_n log p(x_n). ``elbo``: mean_n E_q[log p(x_n, z) - log q(z | x_n)],
    summed over the K values of z, which is log p(x_n) - KL(q(z | x_n) || p(z | x_n)); a guide
    without responsibilities of its own (enumeration) has q = p(z | x) and ELBO =
    log-likelihood. ``responsibility_kl``: mean_n KL(q(z | x_n) || p(z | x_n)), for a guide that
    offers its responsibilities. ``x: [N, D]``.
    """
    log_px = model.marginal_log_prob(x)                                   # [N]
    result = {"log_likelihood": log_px.mean().item()}
    if offers(guide, DISCRETE_POSTERIOR):
        log_q = guide.log_responsibilities(x)                             # [N, K]
        q = log_q.exp()
        kl = torch.where(q > 0, q * (log_q - model.log_responsibilities(x)), 0.0).sum(-1)
        result["elbo"] = (log_px - kl).mean().item()
        result["responsibility_kl"] = kl.mean().item()
    else:
        result["elbo"] = result["log_likelihood"]
    return result
