r"""Factor analysis (Bishop 2006, section 12.2.4; Rubin & Thayer 1982).

Generative process, independently for each row n = 1, ..., N:

    z_n ~ N(0, I_M)
    x_n = W z_n + b + eps_n,        eps_n ~ N(0, diag(psi))

Shapes: ``x: [N, D]``, ``z: [N, M]``, ``W: [D, M]``, ``b: [D]``, ``psi: [D]`` positive (one noise
variance per column), with latent size ``latent_dim`` = M >= 1. Probabilistic PCA
(:mod:`zoo.models.ppca`) is the special case psi = sigma^2 1_D.

Marginal likelihood. Integrating z out, x_n ~ N(b, C) with C = W W^T + Psi, Psi = diag(psi).
With the M x M matrix G = I_M + W^T Psi^-1 W, the Woodbury identity and the matrix
determinant lemma give

    C^-1  = Psi^-1 - Psi^-1 W G^-1 W^T Psi^-1
    det C = det Psi det G,

so with r = x - b, the Cholesky factor L L^T = G and u = L^-1 W^T Psi^-1 r,

    log p(x) = -1/2 [ D log(2 pi) + sum_d log psi_d + 2 sum_m log L_mm
                      + r^T Psi^-1 r - |u|^2 ],

at a cost of O(N D M + D M^2 + M^3).

Posterior. p(z | x) is proportional to N(z | 0, I) N(x | W z + b, Psi); its precision is G,
and completing the square,

    p(z_n | x_n) = N( G^-1 W^T Psi^-1 (x_n - b),  G^-1 ).

As in PPCA the mean is affine in x_n and the covariance does not depend on it, so a Gaussian
guide with a linear encoder and a full covariance (:mod:`zoo.guides.fa`) can be exact.

Maximum likelihood has no closed form; EM or scikit-learn's ``FactorAnalysis`` finds it, and
the tests use the latter as the independent truth.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam
from torch import Tensor, nn
from torch.distributions import constraints

from zoo.contract import EXACT_MARGINAL, EXACT_POSTERIOR


class FactorAnalysis(PyroModule):
    """Factor analysis with parameters ``W: [D, M]``, ``b: [D]`` and ``psi: [D]``.

    ``forward(x)`` samples ``"z"`` (``[N, M]``) and observes ``"x"`` (``[N, D]``) in the plate
    ``"data"``; ``marginal_log_prob`` and ``posterior`` are the closed forms above, at the
    model's own parameters.
    """

    offers = frozenset({EXACT_MARGINAL, EXACT_POSTERIOR})

    def __init__(self, data_dim: int, latent_dim: int):
        super().__init__()
        self.data_dim = data_dim
        self.latent_dim = latent_dim
        self.W = nn.Parameter(0.1 * torch.randn(data_dim, latent_dim))
        self.b = nn.Parameter(torch.zeros(data_dim))
        self.psi = PyroParam(torch.ones(data_dim), constraint=constraints.positive)

    def forward(self, x: Tensor) -> None:
        """p(x, z) = prod_n N(z_n | 0, I_M) N(x_n | W z_n + b, diag(psi)), ``x: [N, D]``."""
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, self.psi.sqrt()).to_event(1),
                        obs=x)

    def _cholesky_of_G(self) -> Tensor:
        """The lower Cholesky factor L of G = I_M + W^T Psi^-1 W, ``[M, M]``."""
        W, psi = self.W, self.psi
        G = torch.eye(self.latent_dim, dtype=W.dtype, device=W.device) + (W.T / psi) @ W
        return torch.linalg.cholesky(G)

    def marginal_log_prob(self, x: Tensor) -> Tensor:
        """log p(x_n) = log N(x_n | b, W W^T + diag(psi)) for each row, ``[N]``."""
        W, psi = self.W, self.psi
        L = self._cholesky_of_G()
        r = x - self.b                                                       # [N, D]
        # u_n = L^-1 W^T Psi^-1 r_n, as rows: u L^T = (r / psi) W
        u = torch.linalg.solve_triangular(L.T, (r / psi) @ W, upper=True, left=False)
        log_det_C = psi.log().sum() + 2 * L.diagonal().log().sum()
        mahalanobis = (r.square() / psi).sum(-1) - u.square().sum(-1)       # r^T C^-1 r
        return -0.5 * (self.data_dim * math.log(2 * math.pi) + log_det_C + mahalanobis)

    def posterior(self, x: Tensor) -> dist.MultivariateNormal:
        """p(z_n | x_n) = N(G^-1 W^T Psi^-1 (x_n - b), G^-1): batch [N], event [M]."""
        L = self._cholesky_of_G()
        loc = torch.cholesky_solve(((x - self.b) / self.psi @ self.W).T, L).T   # [N, M]
        covariance = torch.cholesky_inverse(L)                                  # G^-1
        return dist.MultivariateNormal(loc, scale_tril=torch.linalg.cholesky(covariance))
