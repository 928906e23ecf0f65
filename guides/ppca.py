r"""Amortized guides q(z | x) for probabilistic PCA (:mod:`zoo.models.ppca`).

Both guides mirror the model: ``forward(x)`` with ``x: [N, D]`` samples the site ``"z"``,
``[N, M]``, inside the plate ``"data"`` of size N at dim -1. Both encode x linearly,

    q(z_n | x_n) = N(A x_n + c, Sigma),     A: [M, D], c: [M]  (``self.encoder``),

with a covariance Sigma that does not depend on x_n, because the exact posterior of PPCA,
N(M^-1 W^T (x_n - b), sigma^2 M^-1) with M = W^T W + sigma^2 I_M, has that form. All parameters
belong to the guide (the encoder); the model's are the decoder's.

- :class:`MeanFieldGuide` (``meanfield``): Sigma = diag(s^2).
- :class:`FullGuide` (``full``): Sigma = L L^T, L lower triangular; contains the exact posterior.
  Trained with the model, it shares the model's column lengths g (``tie_lengths``): its mean and
  its scale's rows are divided by exp(g_m), so that lengthening column m of W by e^g_m and
  shortening z_m by e^-g_m, which leaves W z unchanged, is one coordinate instead of a valley
  (see "Lengths" in :mod:`zoo.models.ppca`).

The encoder sees the data whitened, ``L_x^-1 (x - shift)`` with the column means ``shift`` and
the lower Cholesky factor ``L_x`` of the training data's covariance (``initialize_from_data``):
decorrelated inputs of unit variance, on which the encoder's loss is about as curved in every
direction, so Adam's steps suit them all (raw or merely standardized columns of a table with a
few strong directions make the encoder's problem ill-conditioned, and training crawls). The
family is unchanged: A and c absorb the fixed shift and L_x, and the guide is still affine in the
raw x.

``best_for(model)`` builds the member of each family closest to the model's posterior, for every
x at once, so tests can check that bounds are tight (full) or have the known gap (mean field).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam
from torch import Tensor, nn
from torch.distributions import constraints

from zoo.contract import DISTRIBUTION
from zoo.entries.ppca_checks import check_dims

WHITENING_JITTER = 1e-4
"""Added to the data's correlation matrix before its Cholesky factor is taken for whitening."""


class _AffineGaussianGuide(PyroModule):
    """What both guides share: the affine encoder x -> A x + c on whitened inputs, the site
    ``"z"`` in the plate ``"data"``, and how to set A and c in raw units. Subclasses give the
    covariance in ``distribution``."""

    offers = frozenset({DISTRIBUTION})

    def __init__(self, data_dim: int, latent_dim: int):
        super().__init__()
        check_dims(data_dim, latent_dim)
        self.data_dim = data_dim
        self.latent_dim = latent_dim
        self.encoder = PyroModule[nn.Linear](data_dim, latent_dim)
        self.register_buffer("shift", torch.zeros(data_dim))
        self.register_buffer("input_tril", torch.eye(data_dim))

    def initialize_from_data(self, x: Tensor) -> None:
        """Whiten the encoder's input with the column means of ``x: [N, D]`` and the Cholesky
        factor L_x of its covariance S: L_x = diag(sd) chol(R + 1e-4 I), with R the correlation
        matrix (constant columns count as sd 1), so that collinear or constant columns still
        give an invertible factor."""
        r = x - x.mean(0)
        std = r.std(0)
        std = torch.where(std > 0, std, torch.ones_like(std))
        correlation = (r / std).T @ (r / std) / max(x.shape[0] - 1, 1)
        jitter = WHITENING_JITTER * torch.eye(self.data_dim, dtype=x.dtype, device=x.device)
        self.shift.copy_(x.mean(0))
        self.input_tril.copy_(std[:, None] * torch.linalg.cholesky(correlation + jitter))

    def loc(self, x: Tensor) -> Tensor:
        """The mean A x + c of q(z | x), ``[N, M]``."""
        whitened = torch.linalg.solve_triangular(self.input_tril.T, x - self.shift, upper=True,
                                                 left=False)         # (x - shift) L_x^-T
        return self.encoder(whitened)

    def forward(self, x: Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", self.distribution(x))

    @torch.no_grad()
    def _set_affine(self, A: Tensor, c: Tensor) -> None:
        """Make the mean A x + c in raw units: on whitened input that is
        (A L_x) L_x^-1 (x - shift) + (c + A shift)."""
        self.encoder.weight.copy_(A @ self.input_tril)
        self.encoder.bias.copy_(c + A @ self.shift)

    @classmethod
    def _like(cls, model: nn.Module):
        """A new guide in the model's dtype and device, leaving torch's global RNG untouched."""
        with torch.random.fork_rng(devices=[]):
            return cls(model.data_dim, model.latent_dim).to(model.W)


class MeanFieldGuide(_AffineGaussianGuide):
    """q(z_n | x_n) = N(A x_n + c, diag(s^2)): a linear encoder and one scale per latent
    dimension, ``s: [M]``, shared by all x (the exact posterior covariance is constant in x, so
    this family contains the best mean-field fit for every x)."""

    def __init__(self, data_dim: int, latent_dim: int):
        super().__init__(data_dim, latent_dim)
        self.scale = PyroParam(torch.ones(latent_dim), constraint=constraints.positive)

    def distribution(self, x: Tensor) -> dist.Independent:
        """q(z | x) as ``Independent(Normal(A x + c, s), 1)``: batch [N], event [M]."""
        return dist.Normal(self.loc(x), self.scale).to_event(1)

    @classmethod
    def best_for(cls, model: nn.Module) -> MeanFieldGuide:
        """The mean-field guide minimizing KL(q(z|x) || p(z|x)) for every x at the model's
        current parameters.

        For a Gaussian target with precision Lambda = M / sigma^2, the reverse-KL-optimal
        diagonal Gaussian has the target's mean and variances 1 / Lambda_ii (not the marginal
        variances Sigma_ii), so A = M^-1 W^T, c = -A b and

            s_i = 1 / sqrt(Lambda_ii) = sigma / sqrt(sum_d W_di^2 + sigma^2),

        leaving KL = 1/2 (sum_i log Lambda_ii - log det Lambda) >= 0, zero only when the
        columns of W are orthogonal. Built in the model's dtype; torch's global RNG is untouched.
        """
        guide = cls._like(model)
        with torch.no_grad():
            W, sigma = model.W, model.sigma
            A, c, _ = model.posterior_parameters()
            guide._set_affine(A, c)
            guide.scale = sigma / (W.square().sum(0) + sigma**2).sqrt()
        return guide


class FullGuide(_AffineGaussianGuide):
    """q(z_n | x_n) = N(A x_n + c, L L^T): a linear encoder and a lower-triangular ``L: [M, M]``
    with positive diagonal, shared by all x. This family contains the exact posterior.

    Stored as A = diag(exp(-g)) A', c = diag(exp(-g)) c', L = diag(exp(-g)) L', with the
    encoder holding A', c', ``scale_tril`` holding L', and g = ``log_length`` zero and fixed
    until :meth:`tie_lengths` shares the model's g."""

    def __init__(self, data_dim: int, latent_dim: int):
        super().__init__(data_dim, latent_dim)
        self.scale_tril = PyroParam(torch.eye(latent_dim), constraint=constraints.lower_cholesky)
        self.register_buffer("log_length", torch.zeros(latent_dim), persistent=False)

    def tie_lengths(self, model: nn.Module) -> None:
        """Share the model's column lengths g (:meth:`zoo.models.ppca.PPCA.free_lengths`) and keep
        q as it is: A', c' and L' are multiplied by exp(g), which leaves A, c and L unchanged
        (the guide's own g was 0)."""
        log_length = model.free_lengths()
        with torch.no_grad():
            length = (log_length - self.log_length).exp()
            self.encoder.weight.mul_(length[:, None])
            self.encoder.bias.mul_(length)
            self.scale_tril = self.scale_tril * length[:, None]
        del self.log_length
        self.log_length = log_length

    def distribution(self, x: Tensor) -> dist.MultivariateNormal:
        """q(z | x) as ``MultivariateNormal(A x + c, scale_tril=L)``: batch [N], event [M]."""
        shrink = (-self.log_length).exp()
        return dist.MultivariateNormal(self.loc(x) * shrink,
                                       scale_tril=self.scale_tril * shrink[:, None])

    @classmethod
    def best_for(cls, model: nn.Module) -> FullGuide:
        """The exact posterior of the model at its current parameters, as a guide:
        A = M^-1 W^T, c = -A b, L = chol(sigma^2 M^-1), so KL(q(z|x) || p(z|x)) = 0 for every x.
        Built in the model's dtype; torch's global RNG is untouched."""
        guide = cls._like(model)
        with torch.no_grad():
            A, c, L = model.posterior_parameters()
            guide._set_affine(A, c)
            guide.scale_tril = L
        return guide
