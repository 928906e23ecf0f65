"""The sample sites of a model's and a guide's traces, and the checks :func:`~zoo.objectives.draw`
makes on them before it weights them: every site in the data plate (or the batch weighted jointly),
one scale, the particles at dim -2, reparameterized draws, and a guide that samples every latent
site of the model."""

from __future__ import annotations

import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from zoo.contract import DATA_PLATE
from zoo.errors import ZooError

PARTICLE_PLATE = "particles"


def sample_sites(trace: poutine.Trace) -> list[tuple[str, dict]]:
    return [(name, site) for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site_is_subsample(site)]


def latent_sites(trace: poutine.Trace) -> list[tuple[str, dict]]:
    return [(name, site) for name, site in sample_sites(trace) if not site["is_observed"]]


def plates_of(site: dict) -> set[str]:
    return {frame.name for frame in site["cond_indep_stack"]} - {PARTICLE_PLATE}


def check_plates(sites: list[tuple[str, dict]]) -> None:
    """Every sample site must sit inside the data plate (and no other but the particles'): a
    global latent variable has no per-data-point weight."""
    for name, site in sites:
        if plates_of(site) != {DATA_PLATE}:
            raise ZooError(
                f"per-data-point quantities need every sample site inside exactly the "
                f"'{DATA_PLATE}' plate; site '{name}' is in plates {sorted(plates_of(site))}. A "
                f"global latent variable has no weight per data point: train such models with "
                f"the objectives, which weight the batch jointly (see zoo.objectives)")


def check_guide_samples_every_latent(model_sites: list[tuple[str, dict]],
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


def scales_of(sites: list[tuple[str, dict]]) -> dict[float, list[str]]:
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


def subsampling_scale(sites_of_scale: dict[float, list[str]]) -> float:
    """The one scale shared by every sample site. A bound per data point is a log-mean-exp over
    particles, so a scale can only multiply it as a whole."""
    if len(sites_of_scale) > 1:
        raise ZooError(
            f"per-data-point objectives need one scale shared by every sample site of model and "
            f"guide; the sites carry the scales {sites_of_scale}. Subsample or scale the data "
            f"plate as a whole, in model and guide alike")
    return next(iter(sites_of_scale), 1.0)


def check_unscaled(sites: list[tuple[str, dict]], sites_of_scale: dict[float, list[str]]
                    ) -> None:
    """The importance-weighted bound on a whole batch is one log-mean-exp: a subsample's scale
    N_total / N cannot be applied to it site by site."""
    outside = next(name for name, site in sites if plates_of(site) != {DATA_PLATE})
    scaled = {scale: names for scale, names in sites_of_scale.items() if scale != 1.0}
    if scaled:
        raise ZooError(
            f"site '{outside}' is outside the '{DATA_PLATE}' plate, so this objective bounds the "
            f"whole batch jointly, and the sites {scaled} carry the scales of a subsample (or of "
            f"poutine.scale), which such a bound cannot take; use --loss elbo, which scales "
            f"each site, or pass the whole data set unscaled")


def check_plate_dims(sites: list[tuple[str, dict]]) -> None:
    """The particles take dim -2, so every other plate must be at dim -1."""
    for name, site in sites:
        for frame in site["cond_indep_stack"]:
            if frame.name != PARTICLE_PLATE and frame.dim != -1:
                raise ZooError(
                    f"site '{name}' is in the plate '{frame.name}' at dim {frame.dim}; with more "
                    f"than one particle zoo's objectives take the particles at dim -2 and one "
                    f"plate dimension, -1. Use one particle, or Pyro's Trace_ELBO with "
                    f"max_plate_nesting set, for nested plates")


def check_reparameterized(guide_sites: list[tuple[str, dict]]) -> None:
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


def alike(first: object, second: object) -> bool:
    """Whether two masks (None, a bool or a tensor) or two scales are the same everywhere."""
    if first is None or second is None:
        return first is second
    try:
        return bool((torch.as_tensor(first) == torch.as_tensor(second)).all())
    except RuntimeError:  # shapes that do not broadcast
        return False
