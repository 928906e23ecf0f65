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
is the same; ``means``, ``covariances`` and ``set_parameters`` speak the data's units.

Variance floor. The likelihood of a mixture is unbounded: a component that shrinks onto one
point (or a lower-dimensional subspace) drives it to infinity. Every diagonal entry of L_k
(standardized units) is kept above ``SCALE_FLOOR`` = 1e-3 by the parameter's constraint. For
``full``, (L_k)_dd is the standard deviation of u_d given u_1, ..., u_{d-1} in component k, so
the floor bounds every conditional variance below by 1e-6 times the column's variance, much
as scikit-learn's ``reg_covar`` = 1e-6 does, and keeps log N(x | mu_k, Sigma_k) bounded. When
a component's factor sits at the floor a warning says so (``warn_if_floor_binds``: after the
initialization, in ``zoo evaluate``, and in the components figure drawn after training).

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

Initialization and restarts (``initialize_from_data``, R = ``restarts``). Each of R candidate
fits starts from k-means++ seeding (Arthur & Vassilvitskii, 2007) and at most
``KMEANS_STEPS`` Lloyd iterations, takes the weights, means and covariances of the hard
clusters (covariances + 0.01 I in standardized units, so that small clusters start broad), and
is refined by ``REFINE_STEPS`` full-batch Adam steps on the exact mean log-likelihood (all R at
once). The candidate with the highest log-likelihood is kept and SVI continues from it; the R
short fits use the same objective as training, gradient steps only (no EM). On more than
``INIT_ROWS`` rows the initialization uses that many rows drawn at random.
"""

from __future__ import annotations

import math
import warnings

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam
from torch import Tensor, nn
from torch.distributions import constraints, transform_to

from zoo import standardize
from zoo.contract import DISCRETE_POSTERIOR, EXACT_MARGINAL
from zoo.distributions import FlooredLowerCholesky
from zoo.errors import ZooError
from zoo.optimize import minimize

COVARIANCES = ("full", "diag")
PRIORS = ("none", "weak")
SCALE_FLOOR = 1e-3
"""Lower bound of the diagonal of each component's Cholesky factor, standardized units."""
FLOOR_WARNING_FACTOR = 1.5
"""The floor is said to bind when a diagonal entry is below this multiple of it."""
SIMPLEX_TOLERANCE = 1e-5
"""How far from 1 the sum of weights given to ``set_parameters`` may be: float32 round-off."""
WEIGHTS_CONCENTRATION = 2.0
MEAN_PRIOR_SCALE = 10.0
LKJ_CONCENTRATION = 2.0
KMEANS_STEPS = 20
REFINE_STEPS = 30
REFINE_LR = 0.05
INIT_COVARIANCE_JITTER = 0.01
INIT_ROWS = 5000


def scale_constraint(covariance: str) -> constraints.Constraint:
    """The constraint on a component's scale in standardized units: lower-triangular with its
    diagonal above ``SCALE_FLOOR`` (``full``, ``[K, D, D]``) or above it elementwise (``diag``,
    ``[K, D]``)."""
    if covariance == "full":
        return FlooredLowerCholesky(SCALE_FLOOR)
    return constraints.greater_than(SCALE_FLOOR)


# --- checks ----------------------------------------------------------------------------------

def check_options(components: int, covariance: str, prior: str = "none") -> None:
    """Raise :class:`ZooError` unless K >= 1 and the covariance and prior are known."""
    if isinstance(components, bool) or not isinstance(components, int) or components < 1:
        raise ZooError(f"--components must be a positive integer (the number K of mixture "
                       f"components); got {components!r}")
    if covariance not in COVARIANCES:
        raise ZooError(f"--covariance must be one of: {', '.join(COVARIANCES)}; "
                       f"got {covariance!r}")
    if prior not in PRIORS:
        raise ZooError(f"the gmm option prior must be one of: {', '.join(PRIORS)}; got {prior!r}")


def check_table(x: Tensor, data_dim: int | None = None) -> Tensor:
    """Raise :class:`ZooError` unless ``x`` is a finite table ``[N, D]`` (with D = ``data_dim``
    when given); return it."""
    if not isinstance(x, Tensor):
        raise ZooError(f"GMM data must be a torch tensor of shape [N, D]; got {type(x).__name__}")
    if x.dim() != 2:
        fix = " (for one column use x[:, None])" if x.dim() == 1 else ""
        raise ZooError(f"GMM data must be a table of shape [N, D]; got shape {list(x.shape)}"
                       f"{fix}")
    if data_dim is not None and x.shape[1] != data_dim:
        raise ZooError(f"GMM data must have shape [N, D = {data_dim}] to match the model; got "
                       f"shape {list(x.shape)}")
    return x


def check_training_table(x: Tensor, components: int) -> None:
    """The checks a table must pass to fit K components: finite, K <= N, no constant column."""
    N, _ = check_table(x).shape
    if not torch.isfinite(x).all():
        raise ZooError("the data contain NaN or infinite values; remove or impute them first")
    if components > N:
        raise ZooError(f"--components K = {components} is more than the N = {N} training rows; "
                       f"use at most {N} components (far fewer in practice)")
    constant = (x.std(0) == 0).nonzero().flatten().tolist() if N > 1 else list(range(x.shape[1]))
    if constant:
        columns = ", ".join(str(j) for j in constant)
        raise ZooError(f"column(s) {columns} (0-based) of the data are constant, so every "
                       f"component's variance there collapses to 0 and the likelihood is "
                       f"unbounded; pass --drop-constant to leave them out")


# --- closed forms ----------------------------------------------------------------------------

def num_parameters(components: int, data_dim: int, covariance: str) -> int:
    """Free parameters of the mixture: (K - 1) weights, K D means and K D (D + 1) / 2 (full)
    or K D (diag) covariance entries."""
    K, D = components, data_dim
    per_covariance = D * (D + 1) // 2 if covariance == "full" else D
    return (K - 1) + K * D + K * per_covariance


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


# --- initialization --------------------------------------------------------------------------

def kmeans_plus_plus(u: Tensor, components: int, generator: torch.Generator) -> Tensor:
    """K centres ``[K, D]`` chosen among the rows of ``u: [N, D]`` by k-means++: the first at
    random, each next one with probability proportional to its squared distance to the
    nearest centre so far."""
    N = u.shape[0]
    centres = [u[torch.randint(N, (), generator=generator)]]
    nearest = (u - centres[0]).square().sum(-1)                     # [N]
    for _ in range(1, components):
        if not nearest.sum() > 0:
            raise ZooError(f"the data have fewer than K = {components} distinct rows; use fewer "
                           f"--components")
        index = torch.multinomial(nearest, 1, generator=generator)[0]
        centres.append(u[index])
        nearest = torch.minimum(nearest, (u - u[index]).square().sum(-1))
    return torch.stack(centres)


def lloyd(u: Tensor, centres: Tensor, steps: int = KMEANS_STEPS) -> Tensor:
    """Hard cluster labels ``[N]`` after at most ``steps`` Lloyd (k-means) iterations from
    ``centres: [K, D]``; a centre that loses all its points stays where it was."""
    labels = torch.cdist(u, centres).argmin(-1)
    for _ in range(steps):
        counts = torch.bincount(labels, minlength=centres.shape[0]).to(u)   # [K]
        sums = torch.zeros_like(centres).index_add_(0, labels, u)
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centres)
        new_labels = torch.cdist(u, centres).argmin(-1)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return labels


def cluster_moments(u: Tensor, labels: Tensor, components: int, covariance: str
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Weights ``[K]``, means ``[K, D]`` and scales (factors ``[K, D, D]`` or diagonals
    ``[K, D]``) of the hard clusters, each covariance plus ``INIT_COVARIANCE_JITTER`` I.
    An empty cluster gets weight 1 / N, the data mean and the identity."""
    N, D = u.shape
    one_hot = nn.functional.one_hot(labels, components).to(u)       # [N, K]
    sizes = one_hot.sum(0)                                          # [K]
    present = sizes > 0
    weights = sizes.clamp(min=1) / sizes.clamp(min=1).sum()
    means = torch.where(present[:, None], one_hot.T @ u / sizes.clamp(min=1)[:, None],
                        u.mean(0))
    r = u.unsqueeze(-2) - means                                     # [N, K, D]
    if covariance == "full":
        identity = torch.eye(D, dtype=u.dtype, device=u.device)
        covariances = torch.einsum("nk,nki,nkj->kij", one_hot, r, r)
        covariances = torch.where(present[:, None, None],
                                  covariances / sizes.clamp(min=1)[:, None, None], identity)
        scales = torch.linalg.cholesky(covariances + INIT_COVARIANCE_JITTER * identity)
        scales = scales.tril(-1) + torch.diag_embed(
            scales.diagonal(dim1=-2, dim2=-1).clamp(min=2 * SCALE_FLOOR))
    else:
        variances = torch.einsum("nk,nkd->kd", one_hot, r.square())
        variances = torch.where(present[:, None], variances / sizes.clamp(min=1)[:, None], 1.0)
        scales = (variances + INIT_COVARIANCE_JITTER).sqrt().clamp(min=2 * SCALE_FLOOR)
    return weights, means, scales


def refine(u: Tensor, weights: Tensor, locs: Tensor, scales: Tensor, covariance: str,
           steps: int = REFINE_STEPS, lr: float = REFINE_LR) -> tuple[Tensor, Tensor, Tensor,
                                                                      Tensor]:
    """Full-batch Adam on the exact mean log-likelihood of R candidate fits at once.

    ``weights: [R, K]``, ``locs: [R, K, D]``, ``scales: [R, K, D, D]`` or ``[R, K, D]``
    (standardized units, see :func:`standardized_log_prob`). Returns the refined parameters
    and each candidate's mean log-likelihood ``[R]``, all detached.
    """
    transform = transform_to(scale_constraint(covariance))
    logits = weights.log().clone().requires_grad_()
    locs = locs.clone().requires_grad_()
    raw_scales = transform.inv(scales).clone().requires_grad_()

    def mean_log_likelihood() -> Tensor:
        log_pi = torch.log_softmax(logits, -1)                                 # [R, K]
        a = log_pi.unsqueeze(-2) + standardized_log_prob(u, locs, transform(raw_scales))
        return torch.logsumexp(a, -1).mean(-1)                                 # [R]

    minimize(lambda: -mean_log_likelihood().sum(), [logits, locs, raw_scales], steps=steps,
             lr=lr)
    with torch.no_grad():
        final = mean_log_likelihood()
        return (torch.softmax(logits, -1).detach(), locs.detach(),
                transform(raw_scales).detach(), final)


def _listed(flags: Tensor) -> str:
    """The indices k where ``flags: [K]`` is true, as a comma-separated list."""
    return ", ".join(str(k) for k in flags.nonzero().flatten().tolist())


# --- the model -------------------------------------------------------------------------------

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

    def extra_repr(self) -> str:
        return (f"data_dim={self.data_dim}, components={self.components}, "
                f"covariance={self.covariance!r}, prior={self.prior!r}")

    # --- parameters in the data's units ---

    def _full_scales(self) -> Tensor:
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
        return self.scale_in[:, None] * self._full_scales()

    @property
    def covariances(self) -> Tensor:
        """Sigma_k = S L_k L_k^T S, ``[K, D, D]``."""
        L = self.component_scale_tril
        return L @ L.transpose(-1, -2)

    @torch.no_grad()
    def set_parameters(self, weights: Tensor | None = None, means: Tensor | None = None,
                       covariances: Tensor | None = None) -> None:
        """Overwrite any of pi ``[K]``, mu ``[K, D]``, Sigma ``[K, D, D]`` (data's units),
        keeping the model's dtype and device.

        pi must lie on the simplex (positive, summing to 1 within ``SIMPLEX_TOLERANCE``); each
        Sigma_k must be symmetric positive definite, diagonal for ``diag`` models, with its
        standardized Cholesky diagonal above ``SCALE_FLOOR``. Anything else raises
        :class:`ZooError` and leaves the model as it was.
        """
        K, D = self.components, self.data_dim
        if weights is not None:
            weights = self._as_parameter(weights, "weights", (K,))
            if not ((weights > 0).all() and (weights.sum() - 1).abs() <= SIMPLEX_TOLERANCE):
                raise ZooError(f"the weights must be K = {K} positive numbers that sum to 1; got "
                               f"sum {weights.sum():.6g} and smallest {weights.min():.6g} "
                               f"(divide them by their sum; drop components of weight 0)")
        if means is not None:
            locs = (self._as_parameter(means, "means", (K, D)) - self.shift) / self.scale_in
        if covariances is not None:
            scales = self._standardized_scales(
                self._as_parameter(covariances, "covariances", (K, D, D)))
        if weights is not None:
            self.weights = weights
        if means is not None:
            self.locs.copy_(locs)
        if covariances is not None:
            self.scales = scales

    def _as_parameter(self, value: Tensor, name: str, shape: tuple[int, ...]) -> Tensor:
        """``value`` in the model's dtype and device, checked to be finite and of ``shape``."""
        value = torch.as_tensor(value).to(self.locs)
        if value.shape != shape:
            raise ZooError(f"the {name} must have shape {list(shape)} for K = {self.components} "
                           f"components in D = {self.data_dim} dimensions; got shape "
                           f"{list(value.shape)}")
        if not torch.isfinite(value).all():
            raise ZooError(f"the {name} contain NaN or infinite values")
        return value

    def _standardized_scales(self, covariances: Tensor) -> Tensor:
        """What the parameter ``scales`` holds for Sigma ``[K, D, D]`` (data's units): the
        Cholesky factors L_k of S^-1 Sigma_k S^-1 (full) or their diagonals (diag). Raises
        :class:`ZooError` unless every Sigma_k is symmetric positive definite, diagonal for
        ``diag``, and above the variance floor."""
        standardized = covariances / (self.scale_in[:, None] * self.scale_in)
        invalid = ~constraints.positive_definite.check(standardized)
        if invalid.any():
            raise ZooError(f"the covariances of component(s) {_listed(invalid)} are not "
                           f"symmetric positive definite; give each Sigma_k as a symmetric "
                           f"matrix with positive eigenvalues")
        if self.covariance == "diag":
            off_diagonal = standardized - torch.diag_embed(standardized.diagonal(dim1=-2, dim2=-1))
            if off_diagonal.abs().max() > 0:
                raise ZooError("a diag GMM needs diagonal covariances; got off-diagonal "
                               "entries (use covariance='full')")
            scales = diagonal = standardized.diagonal(dim1=-2, dim2=-1).sqrt()
        else:
            scales = torch.linalg.cholesky(standardized)
            diagonal = scales.diagonal(dim1=-2, dim2=-1)
        if (diagonal <= SCALE_FLOOR).any():
            raise ZooError(f"a covariance is below the variance floor (Cholesky diagonal "
                           f"<= {SCALE_FLOOR} column standard deviations); give larger "
                           f"variances")
        return scales

    @torch.no_grad()
    def initialize_from_data(self, x: Tensor, restarts: int = 10,
                             generator: torch.Generator | None = None) -> None:
        """Standardize with x's columns, record N, and start from the best of ``restarts``
        candidate fits (module docstring). Random choices come from ``generator``, else from
        torch's global generator (seeded by the engine before the model is built)."""
        if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
            raise ZooError(f"--restarts must be a positive integer; got {restarts!r}")
        check_training_table(check_table(x, self.data_dim), self.components)
        standardize.fit(self, x)          # no constant column: checked above
        self.num_data.fill_(x.shape[0])
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
        u = ((x.double() - self.shift.double()) / self.scale_in.double()).cpu()
        if u.shape[0] > INIT_ROWS:
            u = u[torch.randperm(u.shape[0], generator=generator)[:INIT_ROWS]]
        candidates = [cluster_moments(u, lloyd(u, kmeans_plus_plus(u, self.components,
                                                                   generator)),
                                      self.components, self.covariance)
                      for _ in range(restarts)]
        weights, locs, scales = (torch.stack(column) for column in zip(*candidates, strict=True))
        weights, locs, scales, log_likelihood = refine(u, weights, locs, scales, self.covariance,
                                                         REFINE_STEPS, REFINE_LR)
        best = int(log_likelihood.argmax())
        like = self.locs
        self.weights = weights[best].to(like)
        self.locs.copy_(locs[best])
        self.scales = scales[best].to(like)
        self.warn_if_floor_binds()

    def warn_if_floor_binds(self) -> bool:
        """Warn, and return True, when a component's factor sits at the variance floor."""
        diagonal = self._full_scales().diagonal(dim1=-2, dim2=-1)          # [K, D]
        stuck = (diagonal < FLOOR_WARNING_FACTOR * SCALE_FLOOR).any(-1)
        if not stuck.any():
            return False
        warnings.warn(f"the GMM's variance floor binds for component(s) {_listed(stuck)}: they "
                      f"have collapsed onto a point or a lower-dimensional subspace of the data "
                      f"(for example repeated rows), where the likelihood is unbounded. Use "
                      f"fewer --components, a diag covariance, or remove duplicated rows.",
                      stacklevel=2)
        return True

    # --- the Pyro model ---

    def _check(self, x: Tensor) -> Tensor:
        return check_table(x, self.data_dim)

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

    def forward(self, x: Tensor) -> None:
        """p(x, z) = prod_n pi_{z_n} N(x_n | mu_{z_n}, Sigma_{z_n}) for ``x: [N, D]`` (times the
        prior, scaled by N_batch / num_data)."""
        self._check(x)
        if self.prior != "none":
            pyro.factor("prior", self.log_prior() * (x.shape[0] / self.num_data))
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Categorical(self.weights),
                            infer={"enumerate": "parallel"})
            pyro.sample("x", self.component_distribution(z), obs=x)

    # --- closed forms at the model's parameters ---

    def component_log_prob(self, x: Tensor) -> Tensor:
        """log N(x_n | mu_k, Sigma_k), ``[N, K]``."""
        u = standardize.standardized(self, self._check(x))
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
