r"""Probabilistic PCA (Tipping & Bishop, 1999, "Probabilistic principal component analysis").

Generative process, independently for each row n = 1, ..., N:

    z_n ~ N(0, I_M)
    x_n = W z_n + b + eps_n,        eps_n ~ N(0, sigma^2 I_D)

Shapes: ``x: [N, D]``, ``z: [N, M]``, ``W: [D, M]``, ``b: [D]``, ``sigma`` a positive scalar,
with latent size 1 <= M < D.

Everything about this model is Gaussian, so everything has a closed form. Following Tipping &
Bishop, the letter M also names the M x M matrix

    M = W^T W + sigma^2 I_M;

in the code below ``M`` is always that matrix and the latent size is ``latent_dim``.

Marginal likelihood. Integrating z out, x_n ~ N(b, C) with C = W W^T + sigma^2 I_D, a D x D
matrix that is never built. The Woodbury identity and the matrix determinant lemma reduce its
inverse and determinant to M:

    C^-1    = sigma^-2 (I_D - W M^-1 W^T)
    det C   = sigma^(2 (D - M)) det M

so with r = x - b, the Cholesky factor L L^T = M and u = L^-1 W^T r,

    log p(x) = -1/2 [ D log(2 pi) + (D - M) log sigma^2 + 2 sum_m log L_mm
                      + (|r|^2 - |u|^2) / sigma^2 ],

which costs O(N D M + D M^2 + M^3) instead of O(D^3).

Posterior. p(z | x) is proportional to N(z | 0, I) N(x | W z + b, sigma^2 I), whose precision
is I + W^T W / sigma^2 = M / sigma^2; completing the square,

    p(z_n | x_n) = N( M^-1 W^T (x_n - b),  sigma^2 M^-1 ).

The mean is affine in x_n, A x_n + c with A = M^-1 W^T and c = -A b, and the covariance does not
depend on x_n at all, so an amortized Gaussian guide with a linear encoder can be exact.

Maximum likelihood (Tipping & Bishop, section 3.2). With b the sample mean, S the sample
covariance with divisor N, and S = U Lambda U^T its eigendecomposition
(Lambda_1 >= ... >= Lambda_D),

    sigma^2 = 1 / (D - M) sum_{j > M} Lambda_j          (the mean discarded variance)
    W       = U_M (Lambda_M - sigma^2 I_M)^(1/2) R,

where U_M holds the M leading eigenvectors and R is any M x M rotation: the likelihood depends on
W only through W W^T. We return R = I.

Rotations also change the posterior without changing the model's marginal: with W' = W R,
M' = R^T M R and the posterior covariance sigma^2 M'^-1 = R^T (sigma^2 M^-1) R. At R = I the
maximum-likelihood M = diag(Lambda_M - sigma^2) + sigma^2 I is diagonal and so is the posterior
covariance (a mean-field guide is exact); a random rotation makes it correlated.

Lengths. Scaling column m of W by a factor e^g_m and z_m by e^-g_m leaves W z unchanged, so the
reconstruction term of the ELBO does not see it; only the prior's KL term pins each column's
length. Trained by gradient steps on W and on the guide's z separately, a long column walks that
valley slowly. The model therefore stores W in coordinates

    W = V diag(exp(g)),        V: [D, M],  g = ``log_length``: [M],

with g fixed at 0 (so W = V) unless a guide ties it to its own scale (``FullGuide.tie_lengths``
in :mod:`zoo.guides.ppca`): then one coordinate, g_m, moves along the valley. The model's
family and its closed forms do not change: everything above reads ``W``.
"""

from __future__ import annotations

import math
import warnings

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam
from torch import Tensor, nn
from torch.distributions import constraints

from zoo.contract import EXACT_MARGINAL, EXACT_POSTERIOR, MAXIMUM_LIKELIHOOD
from zoo.entries.ppca_checks import check_dims
from zoo.errors import ZooError
from zoo.linalg import principal_axes


class PPCA(PyroModule):
    """Probabilistic PCA as a Pyro model with parameters ``W: [D, M]``, ``b: [D]``, ``sigma``.

    ``forward(x)`` has sample sites ``"z"`` (latent, ``[N, M]``) and ``"x"`` (observed,
    ``[N, D]``) inside the plate ``"data"`` at dim -1; it broadcasts under outer plates, e.g.
    particles at dim -2 give ``z: [K, N, M]``. The closed forms of the module docstring are
    available as methods at the model's own parameters: ``marginal_log_prob``, ``posterior`` (and
    its ``posterior_parameters``) and ``maximum_likelihood``.

    ``sigma`` is a constrained parameter: the state dict holds ``sigma_unconstrained`` (its log);
    reading ``model.sigma`` gives the positive value, and ``model.sigma = tensor`` sets it.

    ``W`` is stored as ``V diag(exp(log_length))`` (module docstring, "Lengths"): the state dict
    holds ``V`` and, once a guide ties the lengths (:meth:`free_lengths`), ``log_length``;
    reading ``model.W`` gives W, and ``parameter_values()`` gives W, b and sigma.

    ``V`` and ``b`` are in the units of the data: ``record_scale`` (called by the
    initializations) records the data's scale s (the root mean column variance) and
    ``step_scales`` asks the training engine to step them in units of s
    (:class:`zoo.optimize.StepScaled`), so one learning rate fits tables of any scale.
    ``log sigma`` and ``log_length`` need no scale.
    """

    offers = frozenset({EXACT_MARGINAL, EXACT_POSTERIOR, MAXIMUM_LIKELIHOOD})

    def __init__(self, data_dim: int, latent_dim: int):
        super().__init__()
        check_dims(data_dim, latent_dim)
        self.data_dim = data_dim
        self.latent_dim = latent_dim
        self.V = nn.Parameter(0.1 * torch.randn(data_dim, latent_dim))
        self.register_buffer("log_length", torch.zeros(latent_dim), persistent=False)
        self.b = nn.Parameter(torch.zeros(data_dim))
        self.sigma = PyroParam(torch.tensor(1.0), constraint=constraints.positive)
        self.data_scale = 1.0

    @property
    def W(self) -> Tensor:
        """The loadings W = V diag(exp(g)), ``[D, M]``."""
        return self.V * self.log_length.exp()

    def free_lengths(self) -> nn.Parameter:
        """Make g = ``log_length`` a trained parameter (saved in the state dict) at W's current
        value, and return it, for a guide to share (see "Lengths" in the module docstring)."""
        if not isinstance(self.log_length, nn.Parameter):
            log_length = self.log_length
            del self.log_length
            self.log_length = nn.Parameter(log_length)
        return self.log_length

    def parameter_values(self) -> dict[str, Tensor]:
        """The model's parameters as the module docstring names them: ``W``, ``b``, ``sigma``."""
        return {"W": self.W, "b": self.b, "sigma": self.sigma}

    def forward(self, x: Tensor) -> None:
        """p(x, z) = prod_n N(z_n | 0, I_M) N(x_n | W z_n + b, sigma^2 I_D), ``x: [N, D]``."""
        self._check(x)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, self.sigma).to_event(1), obs=x)

    def marginal_log_prob(self, x: Tensor) -> Tensor:
        """Exact log p(x_n) at the model's parameters, shape [N]."""
        return marginal_log_prob(self._check(x), self.W, self.b, self.sigma)

    def posterior(self, x: Tensor) -> dist.MultivariateNormal:
        """Exact p(z_n | x_n) at the model's parameters: batch shape [N], event shape [M]."""
        return posterior(self._check(x), self.W, self.b, self.sigma)

    def posterior_parameters(self) -> tuple[Tensor, Tensor, Tensor]:
        """The exact posterior p(z | x) = N(A x + c, L L^T) at the model's parameters as
        ``(A: [M, D], c: [M], L: [M, M])`` (:func:`posterior_parameters`)."""
        return posterior_parameters(self.W, self.b, self.sigma)

    def maximum_likelihood(self, x: Tensor) -> PPCA:
        """A new PPCA of the same sizes at the closed-form maximum-likelihood parameters of x,
        in x's dtype and device. This model is untouched, and so is torch's global RNG."""
        W, b, sigma = maximum_likelihood(self._check(x), self.latent_dim)
        with torch.random.fork_rng(devices=[]):
            optimum = PPCA(self.data_dim, self.latent_dim)
        optimum = optimum.to(W)
        optimum.set_parameters(W, b, sigma)
        return optimum

    def step_scales(self) -> dict[str, float]:
        """Parameter name -> the data's scale s, for the parameters in data units."""
        return {"V": self.data_scale, "b": self.data_scale}

    def extra_repr(self) -> str:
        return f"data_dim={self.data_dim}, latent_dim={self.latent_dim}"

    def _check(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.data_dim:
            raise ZooError(f"PPCA data must have shape [N, D = {self.data_dim}] to match the "
                           f"model; got shape {list(x.shape)}")
        return x

    @torch.no_grad()
    def set_parameters(self, W: Tensor | None = None, b: Tensor | None = None,
                       sigma: Tensor | float | None = None) -> None:
        """Overwrite any of W, b, sigma in place, keeping the model's dtype, device and
        lengths g (V = W diag(exp(-g)))."""
        if W is not None:
            self.V.copy_(W * (-self.log_length).exp())
        if b is not None:
            self.b.copy_(b)
        if sigma is not None:
            self.sigma = torch.as_tensor(sigma).to(self.b)

    @torch.no_grad()
    def initialize_from_data(self, x: Tensor) -> None:
        """Start training from the data's location and scale instead of the unit defaults.

        With s^2 the mean column variance of x: b = the column means, sigma = s / 2 and
        W ~ N(0, (s / 10)^2) entrywise (drawn from torch's global RNG; small and random, to break
        the rotation symmetry of W). The same default learning rate then works for tables of any
        scale. Constant data (s = 0) fall back to s = 1.

        Columns whose standard deviations differ by more than a factor of 100 draw a warning:
        the noise sigma^2 I is the same in every column, so PPCA then models little more than
        the largest columns, and training converges slowly; standardizing usually fits the
        question better.
        """
        x = self._check(x)
        std = x.std(0)
        spread = (std.max() / std[std > 0].min()).item() if (std > 0).any() else 1.0
        if spread > 100:
            warnings.warn(f"the data's column standard deviations differ by a factor of "
                          f"{spread:.0f}; PPCA's noise is isotropic, so it will mostly fit the "
                          f"largest columns. Consider --standardize.", stacklevel=2)
        s = x.new_tensor(self.record_scale(x))
        W = 0.1 * s * torch.randn(self.W.shape, dtype=self.W.dtype, device=self.W.device)
        self.set_parameters(W=W, b=x.mean(0), sigma=0.5 * s)

    def record_scale(self, x: Tensor) -> float:
        """Record (in ``data_scale``) and return the data's scale s, the root mean column
        variance of ``x`` (1 for constant data)."""
        s = x.var(0, unbiased=False).mean().sqrt().item() if x.shape[0] > 1 else 0.0
        self.data_scale = s if s > 0 else 1.0
        return self.data_scale


def _cholesky_of_M(W: Tensor, sigma: Tensor) -> Tensor:
    """The lower Cholesky factor L of M = W^T W + sigma^2 I_M, shape [M, M]."""
    M = W.T @ W + sigma**2 * torch.eye(W.shape[-1], dtype=W.dtype, device=W.device)
    return torch.linalg.cholesky(M)


def marginal_log_prob(x: Tensor, W: Tensor, b: Tensor, sigma: Tensor | float) -> Tensor:
    """log p(x_n) = log N(x_n | b, W W^T + sigma^2 I_D) for each row, shape [N].

    ``x: [N, D]`` (any leading shape ``[..., D]`` gives ``[...]``), ``W: [D, M]``, ``b: [D]``.
    Woodbury identity and determinant lemma (module docstring): O(N D M), no D x D matrix.
    """
    D, latent_dim = W.shape
    sigma = torch.as_tensor(sigma, dtype=W.dtype, device=W.device)
    L = _cholesky_of_M(W, sigma)                                # L L^T = M, [M, M]
    r = x - b                                                   # [N, D]
    # u_n = L^-1 W^T r_n, as rows: u L^T = r W
    u = torch.linalg.solve_triangular(L.T, r @ W, upper=True, left=False)   # [N, M]
    log_det_C = (D - latent_dim) * torch.log(sigma**2) + 2 * L.diagonal().log().sum()
    mahalanobis = (r.square().sum(-1) - u.square().sum(-1)) / sigma**2     # r^T C^-1 r, [N]
    return -0.5 * (D * math.log(2 * math.pi) + log_det_C + mahalanobis)


def posterior_parameters(W: Tensor, b: Tensor, sigma: Tensor | float
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """The posterior p(z | x) = N(A x + c, L L^T) as ``(A, c, L)``.

    ``A = M^-1 W^T: [M, D]``, ``c = -A b: [M]`` and ``L = chol(sigma^2 M^-1): [M, M]`` (lower
    triangular). Neither depends on x; this is what an exact amortized guide has to learn.
    """
    sigma = torch.as_tensor(sigma, dtype=W.dtype, device=W.device)
    L_M = _cholesky_of_M(W, sigma)
    A = torch.cholesky_solve(W.T, L_M)                          # M^-1 W^T
    c = -A @ b
    L = sigma * torch.linalg.cholesky(torch.cholesky_inverse(L_M))
    return A, c, L


def posterior(x: Tensor, W: Tensor, b: Tensor, sigma: Tensor | float
              ) -> dist.MultivariateNormal:
    """p(z_n | x_n) = N(M^-1 W^T (x_n - b), sigma^2 M^-1): batch shape [N], event shape [M].

    The Cholesky factor of the covariance is built once, [M, M], and broadcast over the rows.
    """
    A, _, L = posterior_parameters(W, b, sigma)
    loc = (x - b) @ A.T                                         # [N, M]
    return dist.MultivariateNormal(loc, scale_tril=L)


def maximum_likelihood(x: Tensor, latent_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """The closed-form maximum-likelihood ``(W: [D, M], b: [D], sigma: [])`` for ``x: [N, D]``.

    Computed in float64 and returned in x's dtype. Each column of W is made to have its entry of
    largest magnitude positive, so the answer does not depend on the eigensolver's signs.
    """
    if x.dim() != 2:
        raise ZooError(f"PPCA data must be a table of shape [N, D]; got shape {list(x.shape)}")
    N, D = x.shape
    check_dims(D, latent_dim)
    if N < 2:
        raise ZooError(f"the maximum-likelihood PPCA needs at least 2 rows of data; got {N}")
    dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    x = x.to(torch.float64)
    if not torch.isfinite(x).all():
        raise ZooError("the data contain NaN or infinite values; remove or impute them first")

    b = x.mean(0)
    r = x - b
    S = r.T @ r / N                                             # MLE covariance, [D, D]
    Lambda, U = principal_axes(S)                               # descending, signed
    sigma2 = Lambda[latent_dim:].mean()
    if sigma2 <= D * torch.finfo(torch.float64).eps * Lambda[0]:
        raise ZooError(f"the data lie in a subspace of dimension <= {latent_dim}, so the noise "
                       f"variance has maximum-likelihood value 0 and the likelihood is unbounded; "
                       f"use a smaller --latent-dim or more varied data")
    W = U[:, :latent_dim] * (Lambda[:latent_dim] - sigma2).clamp(min=0).sqrt()
    return W.to(dtype), b.to(dtype), sigma2.sqrt().to(dtype)
