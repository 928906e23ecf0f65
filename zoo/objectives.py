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
(see :func:`_routed_surrogate`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property, partial

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO as PyroELBO
from pyro.infer import TraceEnum_ELBO, TraceGraph_ELBO
from pyro.infer.util import is_validation_enabled
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from pyro.util import check_model_guide_match
from torch import Tensor
from torch.distributions import (
    Distribution,
    Independent,
    MultivariateNormal,
    Normal,
    kl_divergence,
)
from torch.func import functional_call

from zoo.errors import ZooError

DATA_PLATE = "data"
PARTICLE_PLATE = "particles"
_MIN_WEIGHT = 1e-20
"""Decoder weights a_k below this are raised to it in the routed surrogate, so that the guide's
share b_k survives the rescaling; the change to the decoder's gradient, at most 1e-20 per
particle, is far below float32 resolution."""


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


def _sample_sites(trace: poutine.Trace) -> list[tuple[str, dict]]:
    return [(name, site) for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site_is_subsample(site)]


def _latent_sites(trace: poutine.Trace) -> list[tuple[str, dict]]:
    return [(name, site) for name, site in _sample_sites(trace) if not site["is_observed"]]


def _plates(site: dict) -> set[str]:
    return {frame.name for frame in site["cond_indep_stack"]} - {PARTICLE_PLATE}


def _check_plates(sites: list[tuple[str, dict]]) -> None:
    """Every sample site must sit inside the data plate (and no other but the particles'): a
    global latent variable has no per-data-point weight."""
    for name, site in sites:
        if _plates(site) != {DATA_PLATE}:
            raise ZooError(
                f"per-data-point quantities need every sample site inside exactly the "
                f"'{DATA_PLATE}' plate; site '{name}' is in plates {sorted(_plates(site))}. A "
                f"global latent variable has no weight per data point: train such models with "
                f"the objectives, which weight the batch jointly (see zoo.objectives)")


def _check_guide_samples_every_latent(model_sites: list[tuple[str, dict]],
                                      guide_sites: list[tuple[str, dict]]) -> None:
    """A latent site of the model that the guide does not sample would be drawn from its prior
    inside the model's replay, and its density left out of the weights: refuse it."""
    guided = {name for name, site in guide_sites if not site["is_observed"]}
    for name, site in model_sites:
        if not site["is_observed"] and name not in guided:
            raise ZooError(
                f"the model's latent site '{name}' is not sampled by the guide, so importance "
                f"weights cannot account for it; use --loss enum (exact enumeration) or --loss "
                f"tracegraph for such models, or a guide that samples '{name}'")


def _scales(sites: list[tuple[str, dict]]) -> dict[float, list[str]]:
    """scale -> the names of the sites that carry it. A site's scale is N_total / N under
    ``pyro.plate("data", N_total, subsample_size=N)``, times that of any ``poutine.scale``."""
    sites_of_scale: dict[float, list[str]] = {}
    for name, site in sites:
        scale = site["scale"]
        if isinstance(scale, Tensor):
            if scale.numel() != 1:
                raise ZooError(f"site '{name}' has a scale of shape {list(scale.shape)}; zoo's "
                               f"objectives take one number as the scale of a site")
            scale = scale.item()
        sites_of_scale.setdefault(float(scale), []).append(name)
    return sites_of_scale


def _subsampling_scale(sites_of_scale: dict[float, list[str]]) -> float:
    """The one scale shared by every sample site. A bound per data point is a log-mean-exp over
    particles, so a scale can only multiply it as a whole."""
    if len(sites_of_scale) > 1:
        raise ZooError(
            f"per-data-point objectives need one scale shared by every sample site of model and "
            f"guide; the sites carry the scales {sites_of_scale}. Subsample or scale the data "
            f"plate as a whole, in model and guide alike")
    return next(iter(sites_of_scale), 1.0)


def _check_unscaled(sites: list[tuple[str, dict]], sites_of_scale: dict[float, list[str]]
                    ) -> None:
    """The importance-weighted bound on a whole batch is one log-mean-exp: a subsample's scale
    N_total / N cannot be applied to it site by site."""
    outside = next(name for name, site in sites if _plates(site) != {DATA_PLATE})
    scaled = {scale: names for scale, names in sites_of_scale.items() if scale != 1.0}
    if scaled:
        raise ZooError(
            f"site '{outside}' is outside the '{DATA_PLATE}' plate, so this objective bounds the "
            f"whole batch jointly, and the sites {scaled} carry the scales of a subsample (or of "
            f"poutine.scale), which such a bound cannot take; use --loss elbo, which scales "
            f"each site, or pass the whole data set unscaled")


def _check_plate_dims(sites: list[tuple[str, dict]]) -> None:
    """The particles take dim -2, so every other plate must be at dim -1."""
    for name, site in sites:
        for frame in site["cond_indep_stack"]:
            if frame.name != PARTICLE_PLATE and frame.dim != -1:
                raise ZooError(
                    f"site '{name}' is in the plate '{frame.name}' at dim {frame.dim}; with more "
                    f"than one particle zoo's objectives take the particles at dim -2 and one "
                    f"plate dimension, -1. Use one particle, or Pyro's Trace_ELBO with "
                    f"max_plate_nesting set, for nested plates")


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
    the model on views of the draws, listed in ``Draws.routes``, for :func:`_routed_surrogate`.

    A site outside the data plate is refused, unless ``allow_joint``: then the draws weight the
    batch jointly (``Draws.joint``, see the module's plate rule), and any scale other than 1 is
    refused unless ``scaled_sites`` (each site then carries its own, as in the ELBO). With
    ``scaled_sites``, sites of different scales inside the data plate are weighted jointly too.
    Under Pyro's validation, model and guide are checked against each other as Pyro's ELBOs
    check them (a guide site missing from the model gives Pyro's warning).
    """
    if num_particles < 1:
        raise ZooError(f"the number of particles must be at least 1; got {num_particles}")
    # one particle needs no particle plate: the same draws, one batch dimension less to handle
    particles = (pyro.plate(PARTICLE_PLATE, num_particles, dim=-2) if num_particles > 1
                 else contextlib.nullcontext())
    with particles:
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        guide_sites = _sample_sites(guide_trace)
        if not allow_joint:
            _check_plates(guide_sites)
        _check_reparameterized(guide_sites)
        if stop_guide_gradients:
            stopped = poutine.replay(_with_parameters_detached(guide), trace=guide_trace)
            q_trace = poutine.trace(stopped).get_trace(*args, **kwargs)
        else:
            q_trace = guide_trace
        routes = []
        if route:
            guide_trace = guide_trace.copy()
            for name, site in _latent_sites(guide_trace):
                site = guide_trace.nodes[name] = dict(site)
                site["value"] = site["value"].view_as(site["value"])
                routes.append((site["value"], site["fn"].event_dim))
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)
                                    ).get_trace(*args, **kwargs)
    model_sites = _sample_sites(model_trace)
    if not allow_joint:
        _check_plates(model_sites)
    if num_particles > 1:
        _check_plate_dims(model_sites + guide_sites)
    _check_guide_samples_every_latent(model_sites, guide_sites)
    if is_validation_enabled():
        # the particle plate (dim -2) lies outside one plate dimension, which may broadcast
        check_model_guide_match(model_trace, guide_trace, max_plate_nesting=1)
    sites = model_sites + guide_sites
    if not sites:
        raise ZooError(f"model and guide have no sample site; an objective needs at least the "
                       f"observed data, as a sample site in the '{DATA_PLATE}' plate")
    _, first = sites[0]
    sites_of_scale = _scales(sites)
    local = all(_plates(site) == {DATA_PLATE} for _, site in sites)
    if local and not (scaled_sites and len(sites_of_scale) > 1):
        data_plate = next(frame for frame in first["cond_indep_stack"]
                          if frame.name == DATA_PLATE)
        return Draws(model_trace=model_trace, guide_trace=guide_trace, q_trace=q_trace,
                     shape=(num_particles, data_plate.size), device=first["value"].device,
                     scale=_subsampling_scale(sites_of_scale), routes=routes)
    if not scaled_sites:
        _check_unscaled(sites, sites_of_scale)
    return Draws(model_trace=model_trace, guide_trace=guide_trace, q_trace=q_trace,
                 shape=(num_particles, 1), device=first["value"].device, joint=True,
                 routes=routes)


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


def _check_reparameterized(guide_sites: list[tuple[str, dict]]) -> None:
    """Pathwise gradients need reparameterized draws; a discrete guide site would silently
    lose its score-function term."""
    if not torch.is_grad_enabled():
        return
    for name, site in guide_sites:
        if not site["is_observed"] and not site["fn"].has_rsample:
            raise ZooError(
                f"guide site '{name}' ({type(site['fn']).__name__}) cannot be reparameterized, "
                f"so this objective's gradient would be wrong; use --loss tracegraph (score "
                f"function) or --loss enum (exact enumeration) for discrete latent variables")


def log_weights(model: Callable, guide: Callable, *args: Tensor, num_particles: int = 1
                ) -> Tensor:
    """Log importance weights ``log p(x_n, z_kn) - log q(z_kn | x_n)`` of shape ``[K, N]``,
    for ``num_particles`` draws per data point (see :func:`draw`)."""
    return draw(model, guide, *args, num_particles=num_particles).log_weights()


def as_multivariate(distribution: Distribution) -> Distribution:
    """A diagonal Gaussian ``Independent(Normal, 1)`` as the equal ``MultivariateNormal``, so
    that its KL divergence to a full-covariance Gaussian has a closed form."""
    if (isinstance(distribution, Independent) and isinstance(distribution.base_dist, Normal)
            and distribution.reinterpreted_batch_ndims == 1):
        normal = distribution.base_dist
        loc, scale = torch.broadcast_tensors(normal.loc, normal.scale)
        return MultivariateNormal(loc, scale_tril=torch.diag_embed(scale))
    return distribution


def _closed_form_kl(q: Distribution, p: Distribution) -> Tensor | None:
    """KL(q || p) in closed form, or None where torch knows none (also for a Gaussian pair of
    which one is diagonal and the other full, through :func:`as_multivariate`)."""
    try:
        return kl_divergence(q, p)
    except NotImplementedError:
        pass
    try:
        return kl_divergence(as_multivariate(q), as_multivariate(p))
    except NotImplementedError:
        return None


def _alike(first: object, second: object) -> bool:
    """Whether two masks (None, a bool or a tensor) or two scales are the same everywhere."""
    if first is None or second is None:
        return first is second
    try:
        return bool((torch.as_tensor(first) == torch.as_tensor(second)).all())
    except RuntimeError:  # shapes that do not broadcast
        return False


def _weighted_alike(guide_site: dict, model_site: dict) -> bool:
    """Whether guide and model mask and scale a latent site alike, so that the Monte-Carlo
    terms m (log q(z) - log p(z)) have the expectation m KL(q || p)."""
    return (_alike(guide_site["mask"], model_site["mask"])
            and _alike(guide_site["scale"], model_site["scale"]))


def latent_kl(draws: Draws) -> Tensor | None:
    """sum over latent sites of KL(q(z | x) || p(z)) in closed form, each masked (and, when
    joint, scaled) as its site, ``[K, N]`` (the same for every particle); or None when a site
    has no closed form, no prior of its own, or a mask or scale in the guide other than in the
    model (then only the Monte-Carlo terms mean what they do)."""
    total = torch.zeros(draws.shape, device=draws.device)
    for name, guide_site in _latent_sites(draws.guide_trace):
        model_site = draws.model_trace.nodes.get(name)
        if model_site is None or not _weighted_alike(guide_site, model_site):
            return None
        kl = _closed_form_kl(guide_site["fn"], model_site["fn"])
        if kl is None:
            return None
        total = total + draws.per_point(guide_site, kl)
    return total


def free_bits_kl(draws: Draws, free_bits: float) -> Tensor:
    """The free-bits KL term of each data point of a minibatch, ``[N]``:

        m_n sum_d max(lambda, mean_{n': m_n' = 1} KL_n'd)

    summed over the latent sites, with KL_nd = 1/2 (mu_nd^2 + s_nd^2 - 1 - log s_nd^2) the
    closed-form KL of a factorized Gaussian q from a standard normal prior in dimension d and
    m_n the site's mask (1 without one): masked data points count as absent."""
    if draws.joint:
        raise ZooError(f"--free-bits counts KL per data point, and this model has a site outside "
                       f"the '{DATA_PLATE}' plate (a global latent variable) or sites of "
                       f"different scales; drop --free-bits")
    total = torch.zeros(draws.shape[1], device=draws.device)
    for name, guide_site in _latent_sites(draws.guide_trace):
        model_site = draws.model_trace.nodes[name]
        q, p = guide_site["fn"], model_site["fn"]
        if not (_is_diagonal_normal(q) and _is_diagonal_normal(p)
                and bool((p.base_dist.loc == 0).all()) and bool((p.base_dist.scale == 1).all())):
            raise ZooError(
                f"--free-bits needs a factorized Gaussian guide and a standard normal prior; "
                f"site '{name}' has guide {type(q).__name__} and prior {type(p).__name__}. "
                f"Use a mean-field guide or drop --free-bits")
        if not _alike(guide_site["mask"], model_site["mask"]):
            raise ZooError(f"--free-bits needs the same mask on site '{name}' in model and guide")
        kl = kl_divergence(q.base_dist, p.base_dist)  # [(K,) N, M], equal over particles
        kl = kl.reshape(*draws.shape, -1)  # [K, N, M]
        m = draws.per_point(guide_site, torch.ones(draws.shape, device=draws.device))  # [K, N]
        per_dimension = (m.unsqueeze(-1) * kl).sum((0, 1)) / m.sum().clamp(min=1)
        total = total + m.mean(0) * per_dimension.clamp(min=free_bits).sum()
    return total


def _is_diagonal_normal(distribution: Distribution) -> bool:
    return isinstance(distribution, Independent) and isinstance(distribution.base_dist, Normal)


def _log_mean_exp(log_w: Tensor, dim: int = 0) -> Tensor:
    return torch.logsumexp(log_w, dim) - math.log(log_w.shape[dim])


def _routed_surrogate(draws: Draws, value: Tensor, decoder_weights: Tensor,
                      encoder_weights: Tensor, kl_weight: float) -> Tensor:
    """A loss whose value is ``value`` and whose gradient is

        - sum_kn a_kn d log w_kn / d theta   for the model's parameters theta,
        - sum_kn b_kn d log w_kn / d phi     for the guide's parameters phi,

    with a = ``decoder_weights``, b = ``encoder_weights`` (``[K, N]``, treated as constants),
    times the subsampling scale of the draws. The model term a_kn log p(x_n, z'_kn) is
    evaluated on views z' of the draws whose incoming gradient is multiplied by b_kn / a_kn, so
    the pathwise part reaching phi through z carries b; the guide term b_kn log q(z_kn | x_n)
    carries b directly. One forward and one backward pass, as for IWAE. Outside autograd the
    value alone is returned.
    """
    if not torch.is_grad_enabled():
        return value
    a = decoder_weights.detach().clamp(min=_MIN_WEIGHT)
    b = encoder_weights.detach()
    ratio = b / a
    for z, event_dim in draws.routes:
        if z.requires_grad:
            factor = draws.per_draw(ratio, z, event_dim)
            z.register_hook(lambda grad, factor=factor: grad * factor)
    model_term = (a * (draws.log_likelihood + kl_weight * draws.log_prior)).sum()
    guide_term = (b * kl_weight * draws.log_q).sum()
    surrogate = -draws.scale * (model_term - guide_term)
    return value.detach() + surrogate - surrogate.detach()


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
    ``free_bits`` lambda > 0 replaces the KL by the free-bits term (see :func:`free_bits_kl`).
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
        return _routed_surrogate(draws, value, decoder_weights, encoder_weights, self.kl_weight)


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
        return _routed_surrogate(draws, value, weights, encoder_weights, self.kl_weight)


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


OBJECTIVES: dict[str, Callable[..., Objective | PyroELBO]] = {
    "elbo": ELBO, "iwae": IWAE, "miwae": MIWAE, "ciwae": CIWAE, "piwae": PIWAE, "dreg": DReG,
    "enum": enumerated_elbo, "tracegraph": score_function_elbo,
}
"""Objective name -> factory taking keyword options (``num_particles``, ...)."""

_OPTION_FLAGS = {"num_groups": "--m", "beta": "--beta", "anneal_epochs": "--anneal-epochs",
                 "free_bits": "--free-bits", "analytic_kl": "analytic_kl"}
_OPTIONS_OF = {"elbo": {"analytic_kl", "free_bits", "anneal_epochs"},
               "iwae": {"anneal_epochs"}, "dreg": {"anneal_epochs"},
               "miwae": {"num_groups", "anneal_epochs"}, "piwae": {"num_groups", "anneal_epochs"},
               "ciwae": {"beta", "anneal_epochs"}, "enum": set(), "tracegraph": set()}


def make_objective(name: str, num_particles: int = 1, **options) -> Objective | PyroELBO:
    """Build the objective registered under ``name``.

    ``num_particles`` P is always the total number of particles per data point; ``num_groups``
    M (miwae, piwae) splits them into M groups of K = P / M. Options that do not apply to the
    objective, and values out of range, are refused with a message naming the flag.
    """
    if name not in OBJECTIVES:
        raise ZooError(f"unknown objective '{name}'; choose one of: {', '.join(OBJECTIVES)}")
    if num_particles < 1:
        raise ZooError(f"--particles must be at least 1; got {num_particles}")
    for option, value in options.items():
        if option not in _OPTIONS_OF[name]:
            users = [objective for objective, known in _OPTIONS_OF.items() if option in known]
            raise ZooError(f"{_OPTION_FLAGS.get(option, option)} does not apply to --loss {name}"
                           f" (it applies to: {', '.join(users) or 'none'})")
        if not math.isfinite(value):
            raise ZooError(f"{_OPTION_FLAGS[option]} must be a finite number; got {value}")
    num_groups = options.get("num_groups", 1)
    if num_groups < 1 or num_particles % num_groups:
        raise ZooError(f"--m {num_groups} must be a positive divisor of --particles "
                       f"{num_particles} (the particles form M groups of K = P / M)")
    if not 0 <= options.get("beta", 0.5) <= 1:
        raise ZooError(f"--beta must be in [0, 1]; got {options['beta']}")
    if options.get("anneal_epochs", 0) < 0:
        raise ZooError(f"--anneal-epochs must be at least 0; got {options['anneal_epochs']}")
    if options.get("free_bits", 0) < 0:
        raise ZooError(f"--free-bits must be at least 0 nats; got {options['free_bits']}")
    return OBJECTIVES[name](num_particles=num_particles, **options)
