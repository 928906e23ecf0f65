r"""Where the Gaussian mixture (:mod:`zoo.models.gmm`) starts, and the checks of its parameters.

Initialization and restarts (:func:`initialize_from_data`, R = ``restarts``). Each of R
candidate fits starts from k-means++ seeding (Arthur & Vassilvitskii, 2007) and at most
``KMEANS_STEPS`` Lloyd iterations, takes the weights, means and covariances of the hard
clusters (covariances + 0.01 I in standardized units, so that small clusters start broad), and
is refined by ``REFINE_STEPS`` full-batch Adam steps on the exact mean log-likelihood (all R at
once). The candidate with the highest log-likelihood is kept and SVI continues from it; the R
short fits use the same objective as training, gradient steps only (no EM). On more than
``INIT_ROWS`` rows the initialization uses that many rows drawn at random.

:func:`set_parameters` starts a model at given weights, means and covariances in the data's
units (for example EM's), and :func:`warn_if_floor_binds` says when a fitted component has
collapsed onto the variance floor.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from torch.distributions import constraints, transform_to

from zoo import standardize
from zoo.entries.gmm_checks import check_table, check_training_table
from zoo.errors import ZooError
from zoo.models.gmm import GMM, SCALE_FLOOR, scale_constraint, standardized_log_prob
from zoo.optimize import minimize

KMEANS_STEPS = 20
REFINE_STEPS = 30
REFINE_LR = 0.05
INIT_COVARIANCE_JITTER = 0.01
INIT_ROWS = 5000
SIMPLEX_TOLERANCE = 1e-5
"""How far from 1 the sum of weights given to :func:`set_parameters` may be: float32 round-off."""
FLOOR_WARNING_FACTOR = 1.5
"""The floor is said to bind when a diagonal entry is below this multiple of it."""


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
    (standardized units, see :func:`~zoo.models.gmm.standardized_log_prob`). Returns the refined
    parameters and each candidate's mean log-likelihood ``[R]``, all detached.
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


@torch.no_grad()
def initialize_from_data(model: GMM, x: Tensor, restarts: int = 10,
                         generator: torch.Generator | None = None) -> None:
    """Standardize ``model`` with x's columns, record N, and start it from the best of
    ``restarts`` candidate fits (module docstring). Random choices come from ``generator``,
    else from torch's global generator (seeded by the engine before the model is built)."""
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise ZooError(f"--restarts must be a positive integer; got {restarts!r}")
    check_training_table(check_table(x, model.data_dim), model.components)
    standardize.fit(model, x)          # no constant column: checked above
    model.num_data.fill_(x.shape[0])
    if generator is None:
        generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
    u = ((x.double() - model.shift.double()) / model.scale_in.double()).cpu()
    if u.shape[0] > INIT_ROWS:
        u = u[torch.randperm(u.shape[0], generator=generator)[:INIT_ROWS]]
    candidates = [cluster_moments(u, lloyd(u, kmeans_plus_plus(u, model.components, generator)),
                                  model.components, model.covariance)
                  for _ in range(restarts)]
    weights, locs, scales = (torch.stack(column) for column in zip(*candidates, strict=True))
    weights, locs, scales, log_likelihood = refine(u, weights, locs, scales, model.covariance,
                                                     REFINE_STEPS, REFINE_LR)
    best = int(log_likelihood.argmax())
    like = model.locs
    model.weights = weights[best].to(like)
    model.locs.copy_(locs[best])
    model.scales = scales[best].to(like)
    warn_if_floor_binds(model)


@torch.no_grad()
def set_parameters(model: GMM, weights: Tensor | None = None, means: Tensor | None = None,
                   covariances: Tensor | None = None) -> None:
    """Overwrite any of pi ``[K]``, mu ``[K, D]``, Sigma ``[K, D, D]`` (data's units) of
    ``model``, keeping its dtype and device.

    pi must lie on the simplex (positive, summing to 1 within ``SIMPLEX_TOLERANCE``); each
    Sigma_k must be symmetric positive definite, diagonal for ``diag`` models, with its
    standardized Cholesky diagonal above ``SCALE_FLOOR``. Anything else raises
    :class:`ZooError` and leaves the model as it was.
    """
    K, D = model.components, model.data_dim
    if weights is not None:
        weights = _as_parameter(model, weights, "weights", (K,))
        if not ((weights > 0).all() and (weights.sum() - 1).abs() <= SIMPLEX_TOLERANCE):
            raise ZooError(f"the weights must be K = {K} positive numbers that sum to 1; got "
                           f"sum {weights.sum():.6g} and smallest {weights.min():.6g} "
                           f"(divide them by their sum; drop components of weight 0)")
    if means is not None:
        locs = (_as_parameter(model, means, "means", (K, D)) - model.shift) / model.scale_in
    if covariances is not None:
        scales = _standardized_scales(
            model, _as_parameter(model, covariances, "covariances", (K, D, D)))
    if weights is not None:
        model.weights = weights
    if means is not None:
        model.locs.copy_(locs)
    if covariances is not None:
        model.scales = scales


def _as_parameter(model: GMM, value: Tensor, name: str, shape: tuple[int, ...]) -> Tensor:
    """``value`` in the model's dtype and device, checked to be finite and of ``shape``."""
    value = torch.as_tensor(value).to(model.locs)
    if value.shape != shape:
        raise ZooError(f"the {name} must have shape {list(shape)} for K = {model.components} "
                       f"components in D = {model.data_dim} dimensions; got shape "
                       f"{list(value.shape)}")
    if not torch.isfinite(value).all():
        raise ZooError(f"the {name} contain NaN or infinite values")
    return value


def _standardized_scales(model: GMM, covariances: Tensor) -> Tensor:
    """What the parameter ``scales`` holds for Sigma ``[K, D, D]`` (data's units): the
    Cholesky factors L_k of S^-1 Sigma_k S^-1 (full) or their diagonals (diag). Raises
    :class:`ZooError` unless every Sigma_k is symmetric positive definite, diagonal for
    ``diag``, and above the variance floor."""
    standardized = covariances / (model.scale_in[:, None] * model.scale_in)
    invalid = ~constraints.positive_definite.check(standardized)
    if invalid.any():
        raise ZooError(f"the covariances of component(s) {_listed(invalid)} are not "
                       f"symmetric positive definite; give each Sigma_k as a symmetric "
                       f"matrix with positive eigenvalues")
    if model.covariance == "diag":
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


def warn_if_floor_binds(model: GMM) -> bool:
    """Warn, and return True, when a component's factor sits at the variance floor (after the
    initialization, in ``zoo evaluate``, and in the components figure drawn after training)."""
    diagonal = model.standardized_scale_tril.diagonal(dim1=-2, dim2=-1)        # [K, D]
    stuck = (diagonal < FLOOR_WARNING_FACTOR * SCALE_FLOOR).any(-1)
    if not stuck.any():
        return False
    warnings.warn(f"the GMM's variance floor binds for component(s) {_listed(stuck)}: they "
                  f"have collapsed onto a point or a lower-dimensional subspace of the data "
                  f"(for example repeated rows), where the likelihood is unbounded. Use "
                  f"fewer --components, a diag covariance, or remove duplicated rows.",
                  stacklevel=2)
    return True


def _listed(flags: Tensor) -> str:
    """The indices k where ``flags: [K]`` is true, as a comma-separated list."""
    return ", ".join(str(k) for k in flags.nonzero().flatten().tolist())
