"""The diagnostics as an ``arviz.InferenceData``: groups ``posterior`` (guide draws ``z``, dims
``(chain, draw, obs, latent)``, and the model's parameters when they are few, constant over
draws), ``reference_posterior`` (exact or NUTS draws, same dims, ``method`` in its attributes),
``observed_data``, ``constant_data`` (labels), ``sample_stats`` (``log_joint`` = log p(x, z) and
``log_q`` = log q(z | x) per draw) and ``metrics`` (the per-point values), saved as NetCDF."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import arviz as az
import numpy as np
import pyro
import xarray as xr
from torch import Tensor, nn

from zoo.contract import LATENT
from zoo.diagnostics.reference import GuideDraws, Reference

MAX_GLOBALS = 1000
"""Model parameters go into the ``posterior`` group only when they number at most this many in
all (PPCA's W, b, sigma; not a VAE's decoder weights)."""


def _global_parameters(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's parameters in their constrained form (``sigma``, not ``sigma_unconstrained``),
    when they number at most ``MAX_GLOBALS`` in all; a model that trains its parameters in other
    coordinates gives their values by ``parameter_values()`` (PPCA's W, b, sigma)."""
    named = dict(model.named_parameters())
    if sum(parameter.numel() for parameter in named.values()) > MAX_GLOBALS:
        return {}
    if hasattr(model, "parameter_values"):
        values = model.parameter_values()
    else:
        constrained = (name.removesuffix("_unconstrained") for name in named)
        values = {name: operator.attrgetter(name)(model) for name in constrained}
    return {name: value.detach().cpu().numpy() for name, value in values.items()}


def _chains(tensor: Tensor, num_chains: int) -> np.ndarray:
    """``[C S, ...]`` as ``[C, S, ...]`` in NumPy."""
    return tensor.detach().cpu().reshape(num_chains, -1, *tensor.shape[1:]).numpy()


def to_inference_data(model, inputs: Sequence[Tensor], points: Tensor, draws: GuideDraws,
                      reference: Reference, per_point: dict[str, Tensor], *,
                      num_chains: int) -> az.InferenceData:
    """The InferenceData described in the module docstring."""
    obs = points.cpu().numpy()
    z = _chains(draws.z, num_chains)
    latent_dims = ["obs", "latent"] if z.ndim == 4 else ["obs"]
    coords = {"obs": obs, "latent": np.arange(z.shape[3])} if z.ndim == 4 else {"obs": obs}
    C, S = z.shape[:2]
    parameters = {name: np.broadcast_to(value, (C, S, *value.shape))
                  for name, value in _global_parameters(model).items()}
    posterior = az.dict_to_dataset({LATENT: z, **parameters}, library=pyro,
                                   coords=coords, dims={LATENT: latent_dims})
    reference_coords = {**coords, "obs": obs[reference.points.cpu().numpy()]}
    reference_posterior = az.dict_to_dataset(
        {LATENT: reference.z.cpu().numpy()}, library=pyro, coords=reference_coords,
        dims={LATENT: latent_dims}, attrs={"method": reference.method, **reference.stats})
    observed = az.dict_to_dataset({"x": inputs[0].cpu().numpy()}, coords={"obs": obs},
                                  dims={"x": ["obs", "feature"]}, default_dims=[])
    groups = {"posterior": posterior, "reference_posterior": reference_posterior,
              "observed_data": observed,
              "sample_stats": az.dict_to_dataset(
                  {"log_joint": _chains(draws.log_joint, num_chains),
                   "log_q": _chains(draws.log_q, num_chains)},
                  library=pyro, coords={"obs": obs}, dims={"log_joint": ["obs"],
                                                           "log_q": ["obs"]}),
              "metrics": xr.Dataset({name: ("obs", value.cpu().numpy())
                                     for name, value in per_point.items()},
                                    coords={"obs": obs})}
    if len(inputs) > 1:
        groups["constant_data"] = az.dict_to_dataset(
            {"y": inputs[1].cpu().numpy()}, coords={"obs": obs}, dims={"y": ["obs"]},
            default_dims=[])
    return az.InferenceData(**groups)
