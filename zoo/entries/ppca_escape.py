r"""Where PPCA's training would stop short of the optimum, and the moves that leave: the
model's ``before_stop`` (:class:`zoo.entry.ModelEntry`), asked each time training to
convergence would stop.

Two kinds of false stop are known. At a saddle point of the likelihood a direction of the data
is left to the noise while a weaker one is modelled (:func:`leave_saddle`). And the mean-field
guide pulls W towards orthogonal columns, where it can be exact, by a force so weak that the
loss looks flat while W is still mixed (:func:`align_columns`). Each move is made only when it
gains more than :data:`MOVE_GAIN` nats per point; neither uses the closed-form solution.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import constraints, transform_to

from zoo.guides.ppca import MeanFieldGuide
from zoo.models.ppca import PPCA

MOVE_GAIN = 1e-3
"""How much a move must gain, in nats per point, before :func:`before_stop` makes it: in
log-likelihood for :func:`leave_saddle`, in the mean-field guide's ELBO for
:func:`align_columns`."""


def _explained(variance: Tensor, sigma2: Tensor) -> Tensor:
    """1/2 f(t), f(t) = t - 1 - log t for t = variance / sigma^2 > 1, else 0: the log-likelihood
    per point that a direction of data variance Lambda (``variance``) adds when W models it, at
    its best length (model variance Lambda), rather than the noise (model variance sigma^2),
    with l(c) = -1/2 (log c + Lambda / c) the log-likelihood along it of a model variance c:
    l(Lambda) - l(sigma^2)."""
    t = (variance / sigma2).clamp(min=1.0)
    return 0.5 * (t - 1 - t.log())


@torch.no_grad()
def leave_saddle(model: PPCA, x: Tensor) -> bool:
    r"""Check, before training stops, that W is at the maximum and not at a saddle point of the
    likelihood; at a saddle, step off it and return True.

    The likelihood's stationary points have W W^T built on eigenvectors of the data covariance
    S; the maximum keeps the M with the largest variances, and every other stationary point is
    a saddle (Tipping & Bishop 1999, appendix A). So at a saddle some direction outside W's
    span has more data variance than one inside it. Along it the likelihood still rises, but
    from the saddle slowly: a column grows at a rate set by its direction's variance over
    sigma^2, a few times at most for a weak direction, and the loss looks converged.

    The check, with W = U diag(s) R^T (thin SVD, s descending) and u_M, s_M, r_M the weakest
    direction's triple: v is the leading eigenvector of S restricted to the complement of the
    other M - 1 directions, P S P with P = I - U_{M-1} U_{M-1}^T. Modelling u_M or v, each at its
    best length, rather than leaving it to the noise adds :func:`_explained` of its data
    variance, Lambda_u = u_M^T S u_M or Lambda_v = v^T S v, so that trading u_M for v gains

        gain = 1/2 [ f(Lambda_v / sigma^2) - f(Lambda_u / sigma^2) ]

    nats per point (exactly, at a stationary point). The gain compares directions, not lengths:
    a column still growing along the right direction is training's to finish. Above
    :data:`MOVE_GAIN`, the weakest direction is replaced by v, at the length that maximizes the
    likelihood along it:

        W <- W + (sqrt(Lambda_v - sigma^2) v - s_M u_M) r_M^T,

    which keeps the other directions and R, and so the guide's coordinates. b, sigma, the other
    M - 1 directions and the guide stay where training put them, and training goes on from
    there: a step along a direction in which the loss curves down, not the closed-form solution.
    At the maximum, v is u_M (up to the training's last digits) and the gain is about 0.
    """
    dtype = torch.float64
    W, sigma2 = model.W.to(dtype), model.sigma.to(dtype) ** 2
    r = x.to(dtype) - x.to(dtype).mean(0)
    S = r.T @ r / x.shape[0]
    U, s, Rt = torch.linalg.svd(W, full_matrices=False)
    kept = U[:, :-1]
    P = torch.eye(model.data_dim, dtype=dtype, device=W.device) - kept @ kept.T
    _, eigenvectors = torch.linalg.eigh(P @ S @ P)
    v, u = eigenvectors[:, -1], U[:, -1]
    variance_v = v @ S @ v
    if _explained(variance_v, sigma2) - _explained(u @ S @ u, sigma2) <= MOVE_GAIN:
        return False
    step = (variance_v - sigma2).sqrt() * v - s[-1] * u
    model.set_parameters(W=(W + torch.outer(step, Rt[-1])).to(model.W))
    return True


def mean_field_gap(model: PPCA) -> Tensor:
    """KL(q* || p(z | x)) for the best mean-field q* at the model's parameters, the same for
    every x: 1/2 (sum_m log Lambda_mm - log det Lambda), Lambda = (W^T W + sigma^2 I) / sigma^2
    the posterior precision (:meth:`MeanFieldGuide.best_for
    <zoo.guides.ppca.MeanFieldGuide.best_for>`); 0 where W's columns are orthogonal."""
    W, sigma2 = model.W.to(torch.float64), model.sigma.to(torch.float64) ** 2
    precision = W.T @ W / sigma2 + torch.eye(W.shape[1], dtype=W.dtype, device=W.device)
    return 0.5 * (precision.diagonal().log().sum() - torch.logdet(precision))


@torch.no_grad()
def align_columns(model: PPCA, guide: MeanFieldGuide) -> bool:
    r"""Rotate W to orthogonal columns, and the mean-field guide with it, when the rotation
    lets the guide gain more than :data:`MOVE_GAIN` nats per point; return whether it did.

    The model depends on W only through W W^T: W R with R orthogonal, and z' = R^T z, is the same
    model with the same likelihood. The mean-field guide, though, falls short of the posterior
    by at least :func:`mean_field_gap` per point, 0 only where W^T W is diagonal. Training
    reaches such a W only by rotating it under the pull of that gap, which is weak: the loss
    stops improving by more than the tolerance while W is still mixed.

    With W = U diag(s) R^T (thin SVD), W R = U diag(s) has orthogonal columns. The guide turns
    with it: its mean A x + c becomes R^T (A x + c), and its scales are the mean-field part of
    the rotated covariance R^T diag(s_q^2) R, the reciprocal square roots of the diagonal of its
    precision R^T diag(s_q^-2) R. The likelihood is unchanged; training goes on from there.
    """
    if mean_field_gap(model) <= MOVE_GAIN:
        return False
    W = model.W.to(torch.float64)
    _, _, Rt = torch.linalg.svd(W, full_matrices=False)
    R = Rt.T
    model.set_parameters(W=(W @ R).to(model.W))
    R = R.to(guide.scale)
    guide.encoder.weight.copy_(R.T @ guide.encoder.weight)
    guide.encoder.bias.copy_(R.T @ guide.encoder.bias)
    scale = (R.T @ torch.diag(guide.scale ** -2) @ R).diagonal().rsqrt()
    # in place, as every move must be (``zoo.train``): PyroModule keeps the positive ``scale``
    # as the parameter ``scale_unconstrained``, its image under the inverse of exp
    guide.scale_unconstrained.copy_(transform_to(constraints.positive).inv(scale))
    return True


def before_stop(model: PPCA, guide: torch.nn.Module, x: Tensor) -> bool:
    """PPCA's ``before_stop``: leave a saddle point (:func:`leave_saddle`), else, with the
    mean-field guide, align W's columns (:func:`align_columns`). True when either moved."""
    return leave_saddle(model, x) or (isinstance(guide, MeanFieldGuide)
                                      and align_columns(model, guide))
