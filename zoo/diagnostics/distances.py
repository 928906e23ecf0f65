r"""Distances between the guide's q(z | x) and the reference posterior p(z | x), per data point
(the KL divergence is :func:`zoo.objectives.posterior_kl`): the errors of means and standard
deviations, and the 2-Wasserstein distance of the Gaussians with q's and p's moments,

    W_2^2 = |m_q - m_p|^2 + tr(S_q + S_p - 2 (S_p^1/2 S_q S_p^1/2)^1/2),

exact for two Gaussians and a lower bound on the W_2 of any pair with those moments
(Gelbrich 1990)."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import Distribution

from zoo.diagnostics.reference import GuideDraws, Reference


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


def moment_errors(q: Distribution | None, draws: GuideDraws, reference: Reference
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
