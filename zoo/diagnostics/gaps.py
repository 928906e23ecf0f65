"""The amortization gap (Cremer, Li & Duvenaud 2018): log p(x) - ELBO(q) splits into the
approximation gap log p(x) - ELBO(q*), q* the member of q's family fitted to this x alone, and
the amortization gap ELBO(q*) - ELBO(q), what sharing one encoder costs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, MultivariateNormal, transform_to

from zoo.contract import DATA_PLATE, DISTRIBUTION, EXACT_MARGINAL, EXACT_POSTERIOR, LATENT, offers
from zoo.diagnostics.reference import frozen
from zoo.diagnostics.settings import DiagnosticSettings
from zoo.evaluate import log_likelihood
from zoo.objectives import closed_form_kl, draw, posterior_kl
from zoo.optimize import minimize
from zoo.progress import progress_bar


class LocalGuide(nn.Module):
    """A guide in the family of an amortized q(z | x) with its own free parameters for each data
    point, started at q's values: the non-amortized q*(z) of Cremer et al. (2018).

    The family is q's distribution class (inside ``Independent`` if q is): its parameters
    (``loc`` and ``scale_tril`` for a ``MultivariateNormal``, else those of ``arg_constraints``)
    are stored unconstrained, ``transform_to(constraint).inv(value)``, one value per data point.
    """

    def __init__(self, q: Distribution):
        super().__init__()
        base, self.event_ndims = ((q.base_dist, q.reinterpreted_batch_ndims)
                                  if isinstance(q, Independent) else (q, 0))
        self.family = type(base)
        names = (("loc", "scale_tril") if isinstance(base, MultivariateNormal)
                 else tuple(base.arg_constraints))
        self.constraints = {name: base.arg_constraints[name] for name in names}
        self.free = nn.ParameterDict({
            name: nn.Parameter(transform_to(constraint).inv(getattr(base, name).detach()).clone())
            for name, constraint in self.constraints.items()})
        self.num_data = q.batch_shape[0]

    @classmethod
    def around(cls, q: Distribution) -> LocalGuide | None:
        """The local guide of q's family, or None when the family cannot be parameterized so."""
        try:
            local = cls(q)
            local.distribution()
        except (NotImplementedError, TypeError, ValueError, AttributeError):
            return None
        return local

    def distribution(self, *inputs: Tensor) -> Distribution:
        """q*(z_n) for each point, batch shape [N] (the inputs are ignored)."""
        parameters = {name: transform_to(constraint)(self.free[name])
                      for name, constraint in self.constraints.items()}
        base = self.family(**parameters)
        return dist.Independent(base, self.event_ndims) if self.event_ndims else base

    def forward(self, *inputs: Tensor) -> None:
        with pyro.plate(DATA_PLATE, self.num_data):
            pyro.sample(LATENT, self.distribution())


@dataclass
class Gaps:
    """Per data point, ``[N]``: log p(x) (``exact`` says whether in closed form), the ELBO of
    the amortized guide and that of the per-point optimum in its family."""

    log_likelihood: Tensor
    elbo: Tensor
    optimal_elbo: Tensor
    exact: bool

    @property
    def approximation(self) -> Tensor:
        """log p(x) - ELBO(q*): what the family cannot do."""
        return self.log_likelihood - self.optimal_elbo

    @property
    def amortization(self) -> Tensor:
        """ELBO(q*) - ELBO(q): what sharing one encoder over all x costs."""
        return self.optimal_elbo - self.elbo


def _fit_local(model, local: LocalGuide, loss: Callable[[], Tensor],
               settings: DiagnosticSettings) -> None:
    """Adam on the local parameters, learning rate decayed to 0 on a cosine, with the model's
    parameters held fixed."""
    bar = progress_bar(settings.local_steps, "gaps: per-point guides", quiet=settings.quiet,
                       unit="step")
    with frozen(model), bar:
        minimize(loss, local.parameters(), steps=settings.local_steps, lr=settings.local_lr,
                 schedule="cosine", on_step=bar.update)


def amortization_gaps(model, guide, *inputs: Tensor, closed_form: bool = True,
                      settings: DiagnosticSettings = DiagnosticSettings()) -> Gaps | None:
    """The gap decomposition for every point; None when the guide exposes no distribution or
    its family cannot be made local.

    With ``closed_form``, a model with ``posterior`` and ``marginal_log_prob`` and a closed-form
    KL from q to that posterior, everything is exact: ELBO(q) = log p(x) - KL(q || p), and q*
    minimizes that KL directly. Otherwise q* maximizes the Monte-Carlo ELBO
    (``local_particles`` per step), the ELBOs of q and q* are estimated with ``elbo_particles``
    draws, and log p(x) is exact where known, else the larger of the two importance-sampling
    estimates with q and q* as proposals (each a stochastic lower bound; Cremer et al. likewise
    keep the tightest bound they have). q* starts at q, and where its ELBO ends below q's, q
    itself is kept: q belongs to the family, so the amortization gap
    is never negative.
    """
    if not offers(guide, DISTRIBUTION):
        return None
    with torch.no_grad():
        q = guide.distribution(*inputs)
        posterior = (model.posterior(*inputs) if closed_form and offers(model, EXACT_POSTERIOR)
                     else None)
    local = LocalGuide.around(q)
    if local is None:
        return None
    exact = (posterior is not None and offers(model, EXACT_MARGINAL)
             and closed_form_kl(q, posterior) is not None)
    if exact:
        _fit_local(model, local,
                   lambda: posterior_kl(local.distribution(), posterior).sum(), settings)
        with torch.no_grad():                  # in float64, so that tiny gaps survive log p(x)
            log_px = model.marginal_log_prob(*inputs).double()
            elbo = log_px - posterior_kl(q, posterior).double()
            optimal = log_px - posterior_kl(local.distribution(), posterior).double()
    else:
        _fit_local(model, local, lambda: -draw(
            model, local, *inputs, num_particles=settings.local_particles).log_weights().sum(),
            settings)
        amortized, fitted = (
            log_likelihood(model, proposal, *inputs, num_samples=settings.elbo_particles,
                           quiet=settings.quiet, desc=f"gaps: ELBO and log p(x) with {name}")
            for proposal, name in ((guide, "q"), (local, "q*")))
        elbo, optimal = amortized.elbo, fitted.elbo
        log_px = (model.marginal_log_prob(*inputs).detach() if offers(model, EXACT_MARGINAL)
                  else torch.maximum(amortized.log_likelihood, fitted.log_likelihood))
    return Gaps(log_px.detach(), elbo.detach(), torch.maximum(optimal, elbo).detach(),
                exact=offers(model, EXACT_MARGINAL))
