"""The registry entry of the variational autoencoder (:mod:`zoo.models.vae`)."""

from __future__ import annotations

from zoo import generation
from zoo.entries.images import IMAGE_MODEL_SETTINGS
from zoo.entry import ModelEntry
from zoo.guides import vae as guides
from zoo.models import vae

ENTRY = ModelEntry(
    name="vae",
    description="variational autoencoder, z ~ N(0, I), x ~ p(x | decoder(z)), with an "
                "MLP or convolutional encoder q(z | x) = N(mu(x), diag sigma(x)^2)",
    build_model=vae.VAE.for_data,
    guides={"meanfield": guides.MeanFieldGuide.for_data},
    plots=generation.VAE_PLOTS,
    figures=("samples", "reconstructions", "latents"),
    **IMAGE_MODEL_SETTINGS,
)
