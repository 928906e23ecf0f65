"""One vectorized pass of guide and model, K particles per data point, and its log densities:
:func:`draw` and the :class:`Draws` it returns, from which every objective takes its log weights
``[K, N]`` (see :mod:`zoo.objectives` for the plate rule)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property, partial

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer.util import is_validation_enabled
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from pyro.util import check_model_guide_match
from torch import Tensor
from torch.func import functional_call

from zoo.contract import DATA_PLATE
from zoo.errors import ZooError
from zoo.objectives.sites import (
    PARTICLE_PLATE,
    check_guide_samples_every_latent,
    check_plate_dims,
    check_plates,
    check_reparameterized,
    check_unscaled,
    latent_sites,
    plates_of,
    sample_sites,
    scales_of,
    subsampling_scale,
)


@dataclass
class Draws:
    """K draws for each of the N data points of the data plate, scored by model and guide; each
    term ``[K, N]`` (``[K, 1]`` when ``joint``).

    ``log_likelihood`` sums the model's observed sites (log p(x | z)), ``log_prior`` its latent
    sites (log p(z)), ``log_q`` the guide's sites (log q(z | x)), each masked and per data point,
    without the subsampling ``scale`` (N_total / N when the data plate subsamples N of N_total
    data points, else 1), which :meth:`sum_over_data` applies to a bound as a whole. When
    ``joint`` (a site outside the data plate: a global latent variable), the batch is one point:
    each term is summed over all the plates of its sites, each site masked and multiplied by its
    own scale, and ``scale`` is 1. Each density is computed when first asked for, so an
    objective pays only for the densities it uses (the ELBO with a closed-form KL never
    evaluates log p(z) or log q(z | x) at the draws). ``model_trace`` and ``guide_trace`` are
    the Pyro traces, ``q_trace`` the trace that scores log q (the guide's, or its replay with the
    parameters detached); ``device`` the draws'; ``routes`` the views of the draws the model was
    replayed on, when gradients are to be routed.
    """

    model_trace: poutine.Trace
    guide_trace: poutine.Trace
    q_trace: poutine.Trace
    shape: tuple[int, int]
    device: torch.device
    scale: float = 1.0
    joint: bool = False
    routes: list[tuple[Tensor, int]] = field(default_factory=list)

    @cached_property
    def log_likelihood(self) -> Tensor:
        return self._summed(self.model_trace, True)

    @cached_property
    def log_prior(self) -> Tensor:
        return self._summed(self.model_trace, False)

    @cached_property
    def log_q(self) -> Tensor:
        return self._summed(self.q_trace, None)

    def log_weights(self, kl_weight: float = 1.0) -> Tensor:
        """log p(x | z) + kl_weight (log p(z) - log q(z | x)): the log weights at weight 1."""
        return self.log_likelihood + kl_weight * (self.log_prior - self.log_q)

    def sum_over_data(self, bound: Tensor) -> Tensor:
        """scale * sum_n bound_n: a per-data-point ``bound`` (``[N]``) summed over the data plate
        and scaled up to the full data set when the plate subsamples it."""
        return self.scale * bound.sum()

    def per_point(self, site: dict, value: Tensor) -> Tensor:
        """A site's ``value`` of the shape of its log density (``[K, N]``, or ``[N]`` for one
        particle), masked as the site is, as a term ``[K, N]``; when ``joint``, also multiplied
        by the site's scale and summed over its plates, ``[K, 1]``."""
        if not self.joint:
            return scale_and_mask(value, 1.0, site["mask"]).expand(self.shape)
        value = scale_and_mask(value, site["scale"], site["mask"])
        return value.reshape(self.shape[0], -1).sum(-1, keepdim=True)

    def per_draw(self, weights: Tensor, z: Tensor, event_dim: int) -> Tensor:
        """``weights`` ``[K, N]`` (``[K, 1]`` when joint) as a factor that broadcasts against a
        draw ``z`` of a latent site with ``event_dim`` event dimensions."""
        if not self.joint:
            return weights.reshape(z.shape[:z.dim() - event_dim] + (1,) * event_dim)
        if self.shape[0] == 1:  # no particle plate
            return weights.reshape(())
        return weights.reshape((-1,) + (1,) * (event_dim + 1))  # the particle plate at dim -2

    def _summed(self, trace: poutine.Trace, observed: bool | None) -> Tensor:
        """Sum of the log densities of a trace's sample sites, each a term of
        :meth:`per_point`; ``observed`` picks observed or latent sites (None: all)."""
        def wanted(name: str, site: dict) -> bool:
            return not site_is_subsample(site) and (observed is None
                                                    or site["is_observed"] == observed)

        trace.compute_log_prob(wanted)
        total = torch.zeros(self.shape, device=self.device)
        for name, site in trace.nodes.items():
            if site["type"] == "sample" and wanted(name, site):
                total = total + self.per_point(site, site["unscaled_log_prob"])
        return total


def draw(model: Callable, guide: Callable, *args: Tensor, num_particles: int = 1,
         stop_guide_gradients: bool = False, route: bool = False, allow_joint: bool = False,
         scaled_sites: bool = False, **kwargs) -> Draws:
    """Draw ``num_particles`` particles per data point from the guide and score them.

    ``args`` and ``kwargs`` are the inputs of model and guide. The guide runs once under a plate
    of K particles at dim -2 and the model is replayed against its draws, so model and guide put
    their data plate (named ``"data"``) at dim -1; its size N (the subsample's, when it
    subsamples) and its scale are those of the draws. Gradients flow through the
    reparameterized draws. ``stop_guide_gradients`` scores log q(z | x) with the guide's
    parameters detached (the draws z keep their gradient): the DReG form. ``route`` replays
    the model on views of the draws, listed in ``Draws.routes``, for
    :func:`~zoo.objectives.routing.routed_surrogate`.

    A site outside the data plate is refused, unless ``allow_joint``: then the draws weight the
    batch jointly (``Draws.joint``, see the plate rule in :mod:`zoo.objectives`), and any scale
    other than 1 is refused unless ``scaled_sites`` (each site then carries its own, as in the
    ELBO). With ``scaled_sites``, sites of different scales inside the data plate are weighted
    jointly too. Under Pyro's validation, model and guide are checked against each other as
    Pyro's ELBOs check them (a guide site missing from the model gives Pyro's warning).
    """
    if num_particles < 1:
        raise ZooError(f"the number of particles must be at least 1; got {num_particles}")
    # one particle needs no particle plate: the same draws, one batch dimension less to handle
    particles = (pyro.plate(PARTICLE_PLATE, num_particles, dim=-2) if num_particles > 1
                 else contextlib.nullcontext())
    with particles:
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        guide_sites = sample_sites(guide_trace)
        if not allow_joint:
            check_plates(guide_sites)
        check_reparameterized(guide_sites)
        q_trace = guide_trace
        if stop_guide_gradients:
            stopped = poutine.replay(_with_parameters_detached(guide), trace=guide_trace)
            q_trace = poutine.trace(stopped).get_trace(*args, **kwargs)
        guide_trace, routes = _with_routes(guide_trace) if route else (guide_trace, [])
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)
                                    ).get_trace(*args, **kwargs)
    model_sites = sample_sites(model_trace)
    if not allow_joint:
        check_plates(model_sites)
    if num_particles > 1:
        check_plate_dims(model_sites + guide_sites)
    check_guide_samples_every_latent(model_sites, guide_sites)
    if is_validation_enabled():
        # the particle plate (dim -2) lies outside one plate dimension, which may broadcast
        check_model_guide_match(model_trace, guide_trace, max_plate_nesting=1)
    return _scored(model_trace, guide_trace, q_trace, model_sites + guide_sites, routes,
                   num_particles, scaled_sites)


def _with_routes(guide_trace: poutine.Trace) -> tuple[poutine.Trace, list[tuple[Tensor, int]]]:
    """A copy of the guide's trace whose latent draws are views of the originals, for the model
    to be replayed on, and those views with their event dimensions (``Draws.routes``)."""
    guide_trace = guide_trace.copy()
    routes = []
    for name, site in latent_sites(guide_trace):
        site = guide_trace.nodes[name] = dict(site)
        site["value"] = site["value"].view_as(site["value"])
        routes.append((site["value"], site["fn"].event_dim))
    return guide_trace, routes


def _scored(model_trace: poutine.Trace, guide_trace: poutine.Trace, q_trace: poutine.Trace,
            sites: list[tuple[str, dict]], routes: list[tuple[Tensor, int]], num_particles: int,
            scaled_sites: bool) -> Draws:
    """The :class:`Draws` of the traces: per data point when every site of ``sites`` (model's
    and guide's) is in the data plate and one scale is shared (or sites may not carry their
    own), else the batch weighted jointly."""
    if not sites:
        raise ZooError(f"model and guide have no sample site; an objective needs at least the "
                       f"observed data, as a sample site in the '{DATA_PLATE}' plate")
    _, first = sites[0]
    traces = {"model_trace": model_trace, "guide_trace": guide_trace, "q_trace": q_trace,
              "device": first["value"].device, "routes": routes}
    sites_of_scale = scales_of(sites)
    local = all(plates_of(site) == {DATA_PLATE} for _, site in sites)
    if local and not (scaled_sites and len(sites_of_scale) > 1):
        data_plate = next(frame for frame in first["cond_indep_stack"]
                          if frame.name == DATA_PLATE)
        return Draws(**traces, shape=(num_particles, data_plate.size),
                     scale=subsampling_scale(sites_of_scale))
    if not scaled_sites:
        check_unscaled(sites, sites_of_scale)
    return Draws(**traces, shape=(num_particles, 1), joint=True)


class _DetachParams(Messenger):
    """Detach the values of ``pyro.param`` sites from their parameters."""

    def _postprocess_message(self, msg: dict) -> None:
        if msg["type"] == "param":
            msg["value"] = msg["value"].detach()


def _with_parameters_detached(guide: Callable) -> Callable:
    """The guide with every parameter it reads held constant: a module's own parameters (through
    ``torch.func.functional_call``) and ``pyro.param`` sites of Pyro's parameter store. Its
    param sites are hidden from the handlers around it, so that ``pyro.infer.SVI`` collects the
    parameters themselves, not these constant copies."""
    if isinstance(guide, torch.nn.Module):
        detached = {name: value.detach() for name, value in guide.named_parameters()}
        guide = partial(functional_call, guide, detached)
        return poutine.block(_DetachParams()(lambda *args, **kwargs: guide(args, kwargs)),
                             hide_types=["param"])
    return poutine.block(_DetachParams()(guide), hide_types=["param"])


def log_weights(model: Callable, guide: Callable, *args: Tensor, num_particles: int = 1
                ) -> Tensor:
    """Log importance weights ``log p(x_n, z_kn) - log q(z_kn | x_n)`` of shape ``[K, N]``,
    for ``num_particles`` draws per data point (see :func:`draw`)."""
    return draw(model, guide, *args, num_particles=num_particles).log_weights()
