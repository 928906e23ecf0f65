"""Training objectives and the per-data-point log importance weights they are built on.

Every objective has Pyro's ELBO interface (``loss``, ``differentiable_loss``,
``loss_and_grads``), so it works in ``pyro.infer.SVI`` as well as in :func:`zoo.train.fit`.
All of them return the loss *summed* over the data points they are given; the engine divides
by the batch size to report nats per data point.

The core quantity is the log importance weight of particle k for data point n,

    log w_kn = log p(x_n, z_kn) - log q(z_kn | x_n),    z_kn ~ q(z | x_n),

of shape ``[K, N]``, computed in one vectorized pass of guide and model under a particle plate.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO, Trace_ELBO, TraceEnum_ELBO, TraceGraph_ELBO
from pyro.poutine.util import site_is_subsample

from zoo.errors import ZooError

DATA_PLATE = "data"
PARTICLE_PLATE = "particles"


def _per_point_log_prob(trace: poutine.Trace, num_particles: int, num_data: int) -> torch.Tensor:
    """Sum of the log densities of a trace's sample sites, kept per particle and data point.

    Returns a tensor of shape ``[K, N]``. Every sample site must sit inside the data plate:
    a global latent variable has no per-data-point weight.
    """
    total = torch.zeros(num_particles, num_data)
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        plates = {frame.name for frame in site["cond_indep_stack"]}
        if DATA_PLATE not in plates or plates - {DATA_PLATE, PARTICLE_PLATE}:
            raise ZooError(
                f"per-data-point importance weights need every sample site inside exactly the "
                f"'{DATA_PLATE}' plate; site '{name}' is in plates {sorted(plates)}. Models with "
                f"global latent variables are trained with Trace_ELBO or enumeration instead."
            )
        total = total.to(site["log_prob"]) + site["log_prob"]
    return total


def log_weights(model: Callable, guide: Callable, *args: torch.Tensor, num_particles: int = 1
                ) -> torch.Tensor:
    """Log importance weights ``log p(x_n, z_kn) - log q(z_kn | x_n)`` of shape ``[K, N]``.

    ``args`` are the model's inputs (data tensors whose first dimension is N). The guide is run
    once under a plate of ``num_particles`` particles at dim -2, and the model is replayed
    against its draws, so model and guide must put their data plate (named ``"data"``) at dim -1.
    Gradients flow through the reparameterized draws.
    """
    if num_particles < 1:
        raise ZooError(f"the number of particles must be at least 1; got {num_particles}")
    num_data = args[0].shape[0]
    with pyro.plate(PARTICLE_PLATE, num_particles, dim=-2):
        guide_trace = poutine.trace(guide).get_trace(*args)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args)
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()
    return (_per_point_log_prob(model_trace, num_particles, num_data)
            - _per_point_log_prob(guide_trace, num_particles, num_data))


def elbo(num_particles: int = 1) -> ELBO:
    """The evidence lower bound E_q[log p(x, z) - log q(z | x)], Pyro's ``Trace_ELBO`` with
    ``num_particles`` draws per data point, vectorized."""
    return Trace_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1,
                      max_plate_nesting=1)


def enumerated_elbo(num_particles: int = 1) -> ELBO:
    """The ELBO with discrete latent variables summed out exactly by parallel enumeration
    (Pyro's ``TraceEnum_ELBO``; sites marked ``infer={"enumerate": "parallel"}``)."""
    return TraceEnum_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1,
                          max_plate_nesting=1)


def score_function_elbo(num_particles: int = 1) -> ELBO:
    """The ELBO for guides with non-reparameterizable (discrete) draws: the score-function
    estimator with Rao-Blackwellization and the baselines Pyro's ``TraceGraph_ELBO`` supports."""
    return TraceGraph_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1,
                           max_plate_nesting=1)


class IWAE:
    """The importance-weighted bound of Burda et al. (2015), per data point:

        L_K(x_n) = E[ log (1/K) sum_k w_kn ],    w_kn = p(x_n, z_kn) / q(z_kn | x_n),

    estimated with one vectorized draw of K particles. The loss is -sum_n L_K(x_n): the
    log-mean-exp is taken for each data point before the sum over the data (unlike Pyro's
    ``RenyiELBO``, whose batch estimate mixes the two, pyro #3104). L_1 is the ELBO, and
    L_K increases to log p(x) as K grows.
    """

    def __init__(self, num_particles: int = 1):
        self.num_particles = num_particles

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        log_w = log_weights(model, guide, *args, num_particles=self.num_particles)
        return -(torch.logsumexp(log_w, 0) - math.log(self.num_particles)).sum()

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return loss.item()


OBJECTIVES: dict[str, Callable[..., ELBO | IWAE]] = {
    "elbo": elbo, "iwae": IWAE, "enum": enumerated_elbo, "tracegraph": score_function_elbo}
"""Objective name -> factory taking keyword options (``num_particles``, ...)."""


def make_objective(name: str, **options) -> ELBO | IWAE:
    """Build the objective registered under ``name`` with the given options."""
    if name not in OBJECTIVES:
        raise ZooError(f"unknown objective '{name}'; choose one of: {', '.join(OBJECTIVES)}")
    if options.get("num_particles", 1) < 1:
        raise ZooError(f"--particles must be at least 1; got {options['num_particles']}")
    return OBJECTIVES[name](**options)
