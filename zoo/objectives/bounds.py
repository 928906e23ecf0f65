r"""The objectives: Pyro's ELBO interface around a loss computed from one :class:`Draws`, the ELBO
(with its closed-form KL, free bits and KL annealing) and the importance-weighted bounds IWAE,
MIWAE, CIWAE, PIWAE and DReG, each a few lines on top of the log weights ``[K, N]``."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from pyro.infer import ELBO as PyroELBO
from torch import Tensor

from zoo.objectives.draws import Draws, draw
from zoo.objectives.kl import free_bits_kl, latent_kl
from zoo.objectives.routing import routed_surrogate


class Objective(PyroELBO):
    """What every objective shares: Pyro's loss interface on top of ``differentiable_loss``,
    the particle count, and the KL-annealing weight. Being a ``pyro.infer.ELBO``, an objective
    also works in ``pyro.infer.SVI`` and as ``objective(model, guide)``, the torch module whose
    call returns the differentiable loss.

    ``kl_weight`` is min(1, epochs / anneal_epochs) after ``set_progress(epochs)``, and 1 without
    annealing.
    """

    scales_each_site = False
    """True for the ELBO, a sum of per-site terms, in which each site may carry its own scale;
    the log-mean-exp of the importance-weighted bounds takes one scale for all (:func:`draw`)."""

    def __init__(self, num_particles: int = 1, anneal_epochs: float = 0.0):
        super().__init__(num_particles=num_particles, max_plate_nesting=1,
                         vectorize_particles=True)
        self.anneal_epochs = anneal_epochs
        self.kl_weight = 1.0 if anneal_epochs == 0 else 0.0

    def draw(self, model: Callable, guide: Callable, args: tuple, kwargs: dict, **options
             ) -> Draws:
        """:func:`draw` with this objective's particles, weighting the batch jointly when a site
        is outside the data plate (each site with its own scale for the ELBO)."""
        return draw(model, guide, *args, num_particles=self.num_particles, allow_joint=True,
                    scaled_sites=self.scales_each_site, **options, **kwargs)

    def set_progress(self, epochs: float) -> None:
        """Tell the objective how many epochs of training are done (KL annealing)."""
        if self.anneal_epochs > 0:
            self.kl_weight = min(1.0, epochs / self.anneal_epochs)

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("zoo objectives draw all particles in one vectorized pass "
                                  "(zoo.objectives.draw), not trace by trace")

    def differentiable_loss(self, model, guide, *args, **kwargs) -> Tensor:
        raise NotImplementedError

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return loss.item()


class ELBO(Objective):
    """The evidence lower bound, per data point and averaged over K draws:

        ELBO(x_n) = E_q[log p(x_n | z)] - KL(q(z | x_n) || p(z)).

    With ``analytic_kl`` (the default) the KL is taken in closed form when every latent site of
    guide and prior has one (Gaussian pairs), else estimated from the draws as
    E_q[log q(z | x) - log p(z)], which is Pyro's ``Trace_ELBO`` estimator draw for draw.
    ``free_bits`` lambda > 0 replaces the KL by the free-bits term
    (see :func:`~zoo.objectives.kl.free_bits_kl`).
    Masked data points count as absent in every form. With a global latent variable the KL
    terms are those of the whole batch, each site's scaled as Pyro scales it, which is Pyro's
    ``Trace_ELBO`` (Monte-Carlo KL) and ``TraceMeanField_ELBO`` (closed form) draw for draw.
    """

    scales_each_site = True

    def __init__(self, num_particles: int = 1, analytic_kl: bool = True, free_bits: float = 0.0,
                 anneal_epochs: float = 0.0):
        super().__init__(num_particles, anneal_epochs)
        self.analytic_kl = analytic_kl
        self.free_bits = free_bits

    def differentiable_loss(self, model, guide, *args, **kwargs) -> Tensor:
        draws = self.draw(model, guide, args, kwargs)
        if self.free_bits > 0:
            return -draws.sum_over_data(draws.log_likelihood.mean(0)
                                        - self.kl_weight * free_bits_kl(draws, self.free_bits))
        kl = latent_kl(draws) if self.analytic_kl else None
        if kl is None:
            return -draws.sum_over_data(draws.log_weights(self.kl_weight).mean(0))
        return -draws.sum_over_data((draws.log_likelihood - self.kl_weight * kl).mean(0))


class IWAE(Objective):
    """The importance-weighted bound of Burda et al. (2015), per data point:

        L_K(x_n) = E[ log (1/K) sum_k w_kn ],    w_kn = p(x_n, z_kn) / q(z_kn | x_n).

    The loss is -sum_n L_K(x_n). L_1 is the ELBO, and L_K increases to log p(x_n) as K grows;
    but the signal-to-noise ratio of its encoder gradient falls like 1 / sqrt(K) (Rainforth et
    al. 2018), which MIWAE, CIWAE, PIWAE and DReG address.
    """

    def differentiable_loss(self, model, guide, *args, **kwargs) -> Tensor:
        draws = self.draw(model, guide, args, kwargs)
        return -draws.sum_over_data(_log_mean_exp(draws.log_weights(self.kl_weight)))


class _Grouped(Objective):
    """P = M K particles per data point in M groups of K, ``[M, K, N]``."""

    def __init__(self, num_particles: int = 1, num_groups: int = 1, anneal_epochs: float = 0.0):
        super().__init__(num_particles, anneal_epochs)
        self.num_groups = num_groups

    def _grouped(self, log_w: Tensor) -> Tensor:
        return log_w.reshape(self.num_groups, -1, log_w.shape[-1])


class MIWAE(_Grouped):
    """The multiply importance-weighted bound (Rainforth et al. 2018): the mean of M independent
    L_K estimates, each on its own group of K particles (P = M K in all),

        MIWAE(M, K)(x_n) = (1/M) sum_m log (1/K) sum_k w_mkn.

    M = 1 is IWAE with K = P; K = 1 is the ELBO with M = P draws.
    """

    def differentiable_loss(self, model, guide, *args, **kwargs) -> Tensor:
        draws = self.draw(model, guide, args, kwargs)
        log_w = self._grouped(draws.log_weights(self.kl_weight))
        return -draws.sum_over_data(_log_mean_exp(log_w, 1).mean(0))


class CIWAE(Objective):
    """The combination bound (Rainforth et al. 2018) on the same K draws,

        CIWAE(x_n) = beta ELBO(x_n) + (1 - beta) L_K(x_n),
        ELBO(x_n) ~= (1/K) sum_k log w_kn,

    a convex combination of two lower bounds, itself a lower bound.
    """

    def __init__(self, num_particles: int = 1, beta: float = 0.5, anneal_epochs: float = 0.0):
        super().__init__(num_particles, anneal_epochs)
        self.beta = beta

    def differentiable_loss(self, model, guide, *args, **kwargs) -> Tensor:
        draws = self.draw(model, guide, args, kwargs)
        log_w = draws.log_weights(self.kl_weight)
        return -draws.sum_over_data(self.beta * log_w.mean(0)
                                    + (1 - self.beta) * _log_mean_exp(log_w))


class PIWAE(_Grouped):
    """The partially importance-weighted estimator (Rainforth et al. 2018): one set of
    P = M K draws; the loss value is -L_{MK}; the model's parameters theta get the gradient of
    L_{MK} and the guide's parameters phi that of MIWAE(M, K), in one step:

        grad_theta = sum_mk  w~_mk                 d log w_mk / d theta   (w~ over all MK)
        grad_phi   = sum_mk  (1/M) w~^(m)_k        d log w_mk / d phi     (w~^(m) within group m)
    """

    def differentiable_loss(self, model, guide, *args, **kwargs) -> Tensor:
        draws = self.draw(model, guide, args, kwargs, route=True)
        log_w = draws.log_weights(self.kl_weight)
        value = -draws.sum_over_data(_log_mean_exp(log_w))
        decoder_weights = torch.softmax(log_w, 0)
        encoder_weights = (torch.softmax(self._grouped(log_w), 1) / self.num_groups
                           ).reshape(log_w.shape)
        return routed_surrogate(draws, value, decoder_weights, encoder_weights, self.kl_weight)


class DReG(Objective):
    """IWAE with the doubly reparameterized encoder gradient of Tucker et al. (2018):

        grad_phi = sum_k [(1 - beta) w~_k + beta w~_k^2]  d log w_k / d z_k  d z_k / d phi,

    where log w_k = log p(x | z_k) + beta (log p(z_k) - log q(z_k | x)) with q's parameters held
    fixed inside log q (only the path through z_k = z(eps_k, phi) is differentiated), and beta
    is the KL-annealing weight (``kl_weight``; 1 without annealing, where the weights are
    w~_k^2). The gradient of L_K is the path term sum_k w~_k d log w_k / d z_k d z_k / d phi plus
    the score term -beta sum_k w~_k d log q(z_k | x) / d phi; the reparameterization identity
    E_q[f(z) d log q(z) / d phi] = E[d f / d z  d z / d phi], with f = w~_k and
    d w~_k / d z_k = w~_k (1 - w~_k) d log w_k / d z_k, turns the score term into
    -beta sum_k w~_k (1 - w~_k) d log w_k / d z_k d z_k / d phi, and the two add up to the
    weights above. Unbiased, without the score term, so its variance does not grow with K. The
    model's parameters get IWAE's gradient sum_k w~_k d log w_k / d theta; the value is -L_K.
    """

    def differentiable_loss(self, model, guide, *args, **kwargs) -> Tensor:
        draws = self.draw(model, guide, args, kwargs, stop_guide_gradients=True, route=True)
        log_w = draws.log_weights(self.kl_weight)
        value = -draws.sum_over_data(_log_mean_exp(log_w))
        weights = torch.softmax(log_w, 0)
        encoder_weights = (1 - self.kl_weight) * weights + self.kl_weight * weights.square()
        return routed_surrogate(draws, value, weights, encoder_weights, self.kl_weight)


def _log_mean_exp(log_w: Tensor, dim: int = 0) -> Tensor:
    return torch.logsumexp(log_w, dim) - math.log(log_w.shape[dim])
