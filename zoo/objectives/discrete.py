"""The ELBO for discrete latent variables, from Pyro: summed out by enumeration, or estimated
with score-function gradients."""

from __future__ import annotations

import torch
from pyro import poutine
from pyro.infer import ELBO as PyroELBO
from pyro.infer import TraceEnum_ELBO, TraceGraph_ELBO
from torch import Tensor


class _EnumeratedELBO(TraceEnum_ELBO):
    """Pyro's ``TraceEnum_ELBO``, whose ``differentiable_loss`` also answers outside autograd
    (the engine's test loss), with the value of ``loss``."""

    def differentiable_loss(self, model, guide, *args, **kwargs) -> Tensor:
        if not torch.is_grad_enabled():
            return torch.tensor(self.loss(model, guide, *args, **kwargs))
        return super().differentiable_loss(model, guide, *args, **kwargs)


class _ScoreFunctionELBO(TraceGraph_ELBO):
    """Pyro's ``TraceGraph_ELBO`` with a ``differentiable_loss``: the value is -ELBO and the
    gradient that of Pyro's surrogate loss (score-function terms with their baselines). A guide
    site marked for enumeration (so that ``enum`` can sum it out) is sampled here, as it
    should be, without Pyro's warning about the mark."""

    def differentiable_loss(self, model, guide, *args, **kwargs) -> Tensor:
        guide = poutine.infer_config(guide, lambda site: {"enumerate": None})
        elbo, surrogate = self._loss_and_surrogate_loss(model, guide, args, kwargs)
        return -torch.as_tensor(elbo).detach() + (surrogate - surrogate.detach())


def enumerated_elbo(num_particles: int = 1) -> PyroELBO:
    """The ELBO with discrete latent variables summed out exactly by parallel enumeration
    (Pyro's ``TraceEnum_ELBO``; sites marked ``infer={"enumerate": "parallel"}``)."""
    return _EnumeratedELBO(num_particles=num_particles, vectorize_particles=num_particles > 1,
                           max_plate_nesting=1)


def score_function_elbo(num_particles: int = 1) -> PyroELBO:
    """The ELBO for guides with non-reparameterizable (discrete) draws: the score-function
    estimator with Rao-Blackwellization and the baselines Pyro's ``TraceGraph_ELBO`` supports."""
    return _ScoreFunctionELBO(num_particles=num_particles,
                              vectorize_particles=num_particles > 1, max_plate_nesting=1)
