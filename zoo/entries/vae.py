"""The registry entry of the variational autoencoder (:mod:`zoo.models.vae`): model and guide
built for a data set, and the figures of :mod:`zoo.figures.images`."""

from __future__ import annotations

from zoo.data import Data
from zoo.entries.images import (
    IMAGE_MODEL_SETTINGS,
    guide_options,
    initialize_from_data,
    resolve_options,
)
from zoo.entry import ModelEntry
from zoo.figures.images import VAE_PLOTS
from zoo.guides.vae import MeanFieldGuide
from zoo.models.vae import VAE


def build_model(data: Data, **options) -> VAE:
    """The VAE for ``data`` with the registry's options (``latent_dim``, ``likelihood``,
    ``architecture``), defaults resolved from the data and the decoder started from it."""
    model = VAE(**resolve_options(data, **options))
    initialize_from_data(model, data.x_train)
    return model


def build_guide(data: Data, **options) -> MeanFieldGuide:
    """The guide matching :func:`build_model` with the same options."""
    return MeanFieldGuide(**guide_options(data, **options))


ENTRY = ModelEntry(
    name="vae",
    description="variational autoencoder, z ~ N(0, I), x ~ p(x | decoder(z)), with an "
                "MLP or convolutional encoder q(z | x) = N(mu(x), diag sigma(x)^2)",
    build_model=build_model,
    guides={"meanfield": build_guide},
    plots=VAE_PLOTS,
    figures=("samples", "reconstructions", "latents"),
    **IMAGE_MODEL_SETTINGS,
)
