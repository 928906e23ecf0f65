r"""Training objectives: the ELBO and the importance-weighted family, all per data point.

Every objective has Pyro's ELBO interface (``loss``, ``differentiable_loss``,
``loss_and_grads``), so it works in ``pyro.infer.SVI`` as well as in :func:`zoo.train.fit`.
All of them return the loss *summed* over the N data points of the data plate, times the scale
that Pyro puts on the sample sites when the plate subsamples N of N_total data points
(N_total / N under ``pyro.plate("data", N_total, subsample_size=N)``; 1 otherwise). The engine
passes minibatches without subsampling and divides by the batch size to report nats per data
point.

The core quantity is the log importance weight of particle k for data point n,

    log w_kn = log p(x_n | z_kn) + log p(z_kn) - log q(z_kn | x_n),    z_kn ~ q(z | x_n),

of shape ``[K, N]``, computed in one vectorized pass of guide and model under a particle plate
(:func:`draw`). Each objective is a few lines on top of it. Writing w~_kn = w_kn / sum_j w_jn
for the normalized weights of data point n:

- ``elbo``     L_1 averaged over K draws: E[log w]; with the KL to the prior in closed form
               where the guide and prior allow it (the "analytic-KL" ELBO).
- ``iwae``     L_K = E[log (1/K) sum_k w_k]                         (Burda et al. 2015)
- ``miwae``    (1/M) sum_m L_K^(m) over M independent groups of K    (Rainforth et al. 2018)
- ``ciwae``    beta ELBO + (1 - beta) L_K on the same K draws         (Rainforth et al. 2018)
- ``piwae``    value L_{MK}; the model (decoder) gets the gradient of L_{MK}, the guide
               (encoder) that of MIWAE(M, K)                          (Rainforth et al. 2018)
- ``dreg``     value L_K; the model gets IWAE's gradient, the guide the doubly reparameterized
               sum_k w~_k^2 d log w_k / d z_k  d z_k / d phi, with q's parameters stopped
               inside log q (under KL annealing with weight beta, the weights are
               (1 - beta) w~_k + beta w~_k^2)                         (Tucker et al. 2018)

Every bound is per data point: the log-mean-exp over particles is taken for each x_n (of the
densities without the subsampling scale) and only then summed over the data and multiplied by
the scale. Pyro's ``RenyiELBO`` keeps the plates that all the model's sample sites share and
takes its log-mean-exp for each of their elements, so without subsampling ``RenyiELBO(alpha=0)``
is ``iwae`` draw for draw; the two differ under ``subsample_size``, where Renyi takes the
log-mean-exp of the *scaled* log weights, (N_total / N) log w_kn, a quantity that bounds
nothing.

**The plate rule.** Local latent variables z_n (one per data point) sit inside
``pyro.plate("data", N)``, with the observations. A sample site outside that plate, a global
latent variable such as a prior on a weight matrix W, makes the objectives weight the whole
batch x_1..N jointly: one log weight per particle,

    log w_k = log p(x, W_k, z_k) - log q(W_k, z_k | x)            ([K, 1]),

each site's log density summed over its plates and multiplied by its own scale. The ELBO, an
average of log weights, is then Pyro's ``Trace_ELBO`` (each site scaled where Pyro scales it,
subsampled plates included); the importance-weighted objectives become the bounds on the joint
log p(x_1..N), e.g. L_K = E[log (1/K) sum_k w_k], which is what ``RenyiELBO(alpha=0)`` computes
on such a model. A subsampled plate has no place in that bound (its N_total / N would sit
inside the log-mean-exp, as in Renyi), so the importance-weighted objectives refuse it there,
and so does free bits, which counts KL per data point.

KL annealing (Bowman et al. 2016) multiplies the latent log-ratio log p(z) - log q(z | x) by a
weight that ramps linearly from 0 to 1 over ``anneal_epochs`` (the engine reports progress
through ``set_progress``). Free bits (Kingma et al. 2016) replace the ELBO's KL term by
sum_d max(lambda, mean_n KL_nd), so that the optimizer gains nothing by pushing a latent
dimension's KL below lambda nats.

Gradients of the decoder and encoder are routed separately (PIWAE, DReG) without extra passes:
the model is replayed on a view z' of each draw whose incoming gradient is rescaled, so that
one backward pass gives the model's parameters the weights a_k and the guide's the weights b_k
(see :func:`~zoo.objectives.routing.routed_surrogate`).

One module per job: :mod:`~zoo.objectives.draws` (:func:`draw` and :class:`Draws`; the checks
on the sites in :mod:`~zoo.objectives.sites`), :mod:`~zoo.objectives.bounds` (the objectives),
:mod:`~zoo.objectives.kl` (closed-form KL with its Monte-Carlo fallback, free bits),
:mod:`~zoo.objectives.routing` (PIWAE's and DReG's surrogate), :mod:`~zoo.objectives.discrete`
(Pyro's enumeration and score-function ELBOs), :mod:`~zoo.objectives.make` (objectives by name)
and :mod:`~zoo.objectives.gradient_snr` (the signal-to-noise ratio of their gradients).
"""

from zoo.contract import DATA_PLATE
from zoo.objectives.bounds import CIWAE, ELBO, IWAE, MIWAE, PIWAE, DReG, Objective
from zoo.objectives.discrete import enumerated_elbo, score_function_elbo
from zoo.objectives.draws import Draws, draw, log_weights
from zoo.objectives.gradient_snr import GradientSNR, gradient_snr
from zoo.objectives.kl import (
    as_multivariate,
    closed_form_kl,
    free_bits_kl,
    latent_kl,
    posterior_kl,
)
from zoo.objectives.make import OBJECTIVES, make_objective
from zoo.objectives.sites import PARTICLE_PLATE

__all__ = [
    "CIWAE", "DATA_PLATE", "ELBO", "IWAE", "MIWAE", "OBJECTIVES", "PARTICLE_PLATE", "PIWAE",
    "DReG", "Draws", "GradientSNR", "Objective", "as_multivariate", "closed_form_kl", "draw",
    "enumerated_elbo", "free_bits_kl", "gradient_snr", "latent_kl", "log_weights",
    "make_objective", "posterior_kl", "score_function_elbo",
]
