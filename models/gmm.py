r"""The Gaussian mixture model, with its assignments summed out exactly.

Generative process, independently for each row n = 1, ..., N:

    z_n ~ Categorical(pi)                          (which of the K components)
    x_n | z_n = k ~ N(mu_k, Sigma_k)

Shapes: ``x: [N, D]``, ``z: [N]`` with values in {0, ..., K-1}, ``pi: [K]`` on the simplex,
``mu: [K, D]``, ``Sigma: [K, D, D]``; K >= 1 components. ``covariance="full"`` gives each
component a full covariance Sigma_k = L_k L_k^T (L_k lower triangular with a positive diagonal,
so Sigma_k is positive definite by construction); ``covariance="diag"`` a diagonal one,
Sigma_k = diag(s_k^2).

Coordinates. The model stores its parameters for the data standardized column by column,
u = (x - c) / s with the training data's column means ``c: [D]`` and standard deviations
``s: [D]`` (buffers ``shift`` and ``scale_in``), so that one learning rate suits tables in any
units. In those coordinates component k is N(m_k, L_k L_k^T); in the data's own units

    mu_k = c + s * m_k,        Sigma_k = S L_k L_k^T S,        S = diag(s),

and log N(x | mu_k, Sigma_k) = log N(u | m_k, L_k L_k^T) - sum_d log s_d. The family of mixtures
is the same; ``means`` and ``covariances`` speak the data's units.

Variance floor. The likelihood of a mixture is unbounded: a component that shrinks onto one
point (or a lower-dimensional subspace) drives it to infinity. Every diagonal entry of L_k
(standardized units) is kept above ``SCALE_FLOOR`` = 1e-3 by the parameter's constraint. For
``full``, (L_k)_dd is the standard deviation of u_d given u_1, ..., u_{d-1} in component k, so
the floor bounds every conditional variance below by 1e-6 times the column's variance, much
as scikit-learn's ``reg_covar`` = 1e-6 does, and keeps log N(x | mu_k, Sigma_k) bounded. When
a component's factor sits at the floor a warning says so
(:func:`zoo.entries.gmm_start.warn_if_floor_binds`).

Exact marginal and posterior. With a_nk = log pi_k + log N(x_n | mu_k, Sigma_k) (``joint_log_prob``,
``[N, K]``), summing z out gives

    log p(x_n) = logsumexp_k a_nk                                       (``marginal_log_prob``)
    gamma_nk = p(z_n = k | x_n) = exp(a_nk - log p(x_n))                (``responsibilities``)

and the most probable assignment argmax_k gamma_nk is what ``infer_discrete`` with temperature 0
returns (``assignments``).

Inference. ``forward(x)`` marks z for parallel enumeration, so Pyro's ``TraceEnum_ELBO`` sums it
out and its loss with a guide without sample sites is exactly -sum_n log p(x_n) (minus the log
prior, below): pi, mu and Sigma are point estimates, as with a Delta guide on them. An amortized
guide q(z | x) (:mod:`zoo.guides.gmm`) replaces the exact sum by draws of z instead. Large
tables are trained in minibatches: the engine calls ``forward`` with B of the N rows, the plate
``"data"`` has size B and is not rescaled by N / B, so the loss stays in nats per data point.

Priors. ``prior="none"`` (the default) is maximum likelihood. ``prior="weak"`` adds

    pi ~ Dirichlet(2 * 1_K)                          (one pseudo-count per component)
    mu_kd ~ N(c_d, (10 s_d)^2)                       (ten data standard deviations)
    R_k ~ LKJ(2)  on the correlation matrix of Sigma_k (``full`` with D >= 2 only),

the LKJ density taken on the Cholesky factor of R_k, which is the rows of L_k scaled to unit
length. Training then finds the MAP estimate in this parametrization. ``forward`` scales the
log prior by B / N for a minibatch of B of the N training rows (``num_data``), so the loss per
data point is, in expectation over minibatches, -log prior / N - mean_n log p(x_n).

The starting point (k-means++ and restarts), option checks and ``set_parameters`` live in the
model's adapter (:mod:`zoo.entries.gmm_start`, :mod:`zoo.entries.gmm_checks`).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam
from torch import Tensor, nn
from torch.distributions import constraints

from zoo import standardize
from zoo.contract import DISCRETE_POSTERIOR, EXACT_MARGINAL
from zoo.distributions import FlooredLowerCholesky
from zoo.entries.gmm_checks import check_options, check_table
from zoo.errors import ZooError

SCALE_FLOOR = 1e-3
"""Lower bound of the diagonal of each component's Cholesky factor, standardized units."""
WEIGHTS_CONCENTRATION = 2.0
MEAN_PRIOR_SCALE = 10.0
LKJ_CONCENTRATION = 2.0


class GMM(PyroModule):
    """A Gaussian mixture of K components in D dimensions as a Pyro model.

    Parameters (standardized units, see the module docstring): ``weights: [K]`` (simplex),
    ``locs: [K, D]`` and ``scales``: ``[K, D, D]`` lower-triangular (full) or ``[K, D]``
    (diag), with the floored constraint. Buffers: ``shift``, ``scale_in`` ``[D]`` and
    ``num_data`` (N, for the prior's minibatch scale). ``means``, ``covariances`` and
    ``component_scale_tril`` give the components in the data's units.

    ``forward(x)`` has sample sites ``"z"`` (``[N]``, marked for parallel enumeration) and
    ``"x"`` (observed, ``[N, D]``) inside the plate ``"data"`` at dim -1, and with
    ``prior="weak"`` a factor ``"prior"`` outside it.
    """

    offers = frozenset({EXACT_MARGINAL, DISCRETE_POSTERIOR})

    def __init__(self, data_dim: int, components: int = 3, covariance: str = "full",
                 prior: str = "none"):
        super().__init__()
        check_options(components, covariance, prior)
        if data_dim < 1:
            raise ZooError(f"GMM data need at least one column; got D = {data_dim}")
        self.data_dim, self.components = data_dim, components
        self.covariance, self.prior = covariance, prior
        K, D = components, data_dim
        self.weights = PyroParam(torch.full((K,), 1.0 / K), constraint=constraints.simplex)
        self.locs = nn.Parameter(torch.zeros(K, D))
        identity = torch.eye(D).expand(K, D, D) if covariance == "full" else torch.ones(K, D)
        self.scales = PyroParam(identity.clone(), constraint=scale_constraint(covariance))
        standardize.add_buffers(self, D)
        self.register_buffer("num_data", torch.tensor(1))

    def forward(self, x: Tensor) -> None:
        """p(x, z) = prod_n pi_{z_n} N(x_n | mu_{z_n}, Sigma_{z_n}) for ``x: [N, D]`` (times the
        prior, scaled by N_batch / num_data)."""
        check_table(x, self.data_dim)
        if self.prior != "none":
            pyro.factor("prior", self.log_prior() * (x.shape[0] / self.num_data))
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Categorical(self.weights),
                            infer={"enumerate": "parallel"})
            pyro.sample("x", self.component_distribution(z), obs=x)

    def component_distribution(self, z: Tensor) -> dist.TorchDistribution:
        """p(x | z) for an assignment tensor z of any shape: batch shape z's, event [D]."""
        loc = self.means[z]
        if self.covariance == "full":
            return dist.MultivariateNormal(loc, scale_tril=self.component_scale_tril[z])
        return dist.Normal(loc, (self.scale_in * self.scales)[z]).to_event(1)

    def log_prior(self) -> Tensor:
        """log p(pi, mu, R) of the weak prior (module docstring), a scalar; 0 without one."""
        if self.prior == "none":
            return self.locs.new_zeros(())
        K, D = self.components, self.data_dim
        log_p = dist.Dirichlet(self.locs.new_full((K,), WEIGHTS_CONCENTRATION)
                               ).log_prob(self.weights)
        log_p = log_p + dist.Normal(self.shift, MEAN_PRIOR_SCALE * self.scale_in
                                    ).log_prob(self.means).sum()
        if self.covariance == "full" and D >= 2:
            L = self.scales
            correlation_tril = L / L.norm(dim=-1, keepdim=True)
            log_p = log_p + dist.LKJCholesky(D, L.new_tensor(LKJ_CONCENTRATION)
                                             ).log_prob(correlation_tril).sum()
        return log_p

    def extra_repr(self) -> str:
        return (f"data_dim={self.data_dim}, components={self.components}, "
                f"covariance={self.covariance!r}, prior={self.prior!r}")

    # --- parameters in the data's units ---

    @property
    def standardized_scale_tril(self) -> Tensor:
        """The standardized factors L_k as matrices, ``[K, D, D]``."""
        scales = self.scales
        return scales if self.covariance == "full" else torch.diag_embed(scales)

    @property
    def means(self) -> Tensor:
        """mu_k = c + s * m_k, ``[K, D]``."""
        return self.shift + self.scale_in * self.locs

    @property
    def component_scale_tril(self) -> Tensor:
        """The Cholesky factors S L_k of Sigma_k, ``[K, D, D]``."""
        return self.scale_in[:, None] * self.standardized_scale_tril

    @property
    def covariances(self) -> Tensor:
        """Sigma_k = S L_k L_k^T S, ``[K, D, D]``."""
        L = self.component_scale_tril
        return L @ L.transpose(-1, -2)

    # --- closed forms at the model's parameters ---

    def component_log_prob(self, x: Tensor) -> Tensor:
        """log N(x_n | mu_k, Sigma_k), ``[N, K]``."""
        u = standardize.standardized(self, check_table(x, self.data_dim))
        return standardized_log_prob(u, self.locs, self.scales) - self.scale_in.log().sum()

    def joint_log_prob(self, x: Tensor) -> Tensor:
        """a_nk = log pi_k + log N(x_n | mu_k, Sigma_k) = log p(x_n, z_n = k), ``[N, K]``."""
        return self.weights.log() + self.component_log_prob(x)

    def marginal_log_prob(self, x: Tensor) -> Tensor:
        """Exact log p(x_n) = logsumexp_k a_nk, ``[N]``."""
        return torch.logsumexp(self.joint_log_prob(x), -1)

    def log_responsibilities(self, x: Tensor) -> Tensor:
        """log gamma_nk = log p(z_n = k | x_n), ``[N, K]``."""
        return torch.log_softmax(self.joint_log_prob(x), -1)

    def responsibilities(self, x: Tensor) -> Tensor:
        """gamma_nk = p(z_n = k | x_n), ``[N, K]``; each row sums to 1."""
        return self.log_responsibilities(x).exp()

    def assignments(self, x: Tensor) -> Tensor:
        """The most probable component argmax_k gamma_nk of each row, ``[N]`` int64."""
        return self.joint_log_prob(x).argmax(-1)

    def bic(self, x: Tensor) -> float:
        """The Bayesian information criterion of the whole table ``x``,
        -2 sum_n log p(x_n) + p log N with p = :func:`num_parameters` (lower is better;
        the same definition as scikit-learn's ``GaussianMixture.bic``)."""
        p = num_parameters(self.components, self.data_dim, self.covariance)
        return float(-2 * self.marginal_log_prob(x).sum() + p * math.log(x.shape[0]))


def scale_constraint(covariance: str) -> constraints.Constraint:
    """The constraint on a component's scale in standardized units: lower-triangular with its
    diagonal above ``SCALE_FLOOR`` (``full``, ``[K, D, D]``) or above it elementwise (``diag``,
    ``[K, D]``)."""
    if covariance == "full":
        return FlooredLowerCholesky(SCALE_FLOOR)
    return constraints.greater_than(SCALE_FLOOR)


def standardized_log_prob(u: Tensor, locs: Tensor, scales: Tensor) -> Tensor:
    """log N(u_n | m_k, L_k L_k^T) for every row and component, ``[..., N, K]``.

    ``u: [N, D]``; ``locs: [..., K, D]``; ``scales`` the factors L_k, lower-triangular
    ``[..., K, D, D]`` (full) or their diagonals ``[..., K, D]`` (diag). Leading dimensions of
    the parameters (candidate fits) lead the result. With y = L_k^-1 (u_n - m_k) (the K inverse
    factors are formed once: one small inverse per component, not one solve per row),

        log N = -1/2 (D log 2 pi + |y|^2) - sum_d log (L_k)_dd.
    """
    D = u.shape[-1]
    r = u.unsqueeze(-2) - locs.unsqueeze(-3)                       # [..., N, K, D]
    if scales.dim() == locs.dim() + 1:                             # full
        identity = torch.eye(D, dtype=u.dtype, device=u.device)
        L_inv = torch.linalg.solve_triangular(scales, identity, upper=False)  # [..., K, D, D]
        y = (L_inv.unsqueeze(-4) @ r.unsqueeze(-1)).squeeze(-1)
        log_det = scales.diagonal(dim1=-2, dim2=-1).log().sum(-1)    # [..., K]
    else:
        y = r / scales.unsqueeze(-3)
        log_det = scales.log().sum(-1)
    return -0.5 * (D * math.log(2 * math.pi) + y.square().sum(-1)) - log_det.unsqueeze(-2)


def num_parameters(components: int, data_dim: int, covariance: str) -> int:
    """Free parameters of the mixture: (K - 1) weights, K D means and K D (D + 1) / 2 (full)
    or K D (diag) covariance entries."""
    K, D = components, data_dim
    per_covariance = D * (D + 1) // 2 if covariance == "full" else D
    return (K - 1) + K * D + K * per_covariance
