"""The registry entry of the label-conditioned VAE (:mod:`zoo.models.cvae`)."""

from __future__ import annotations

from zoo import generation
from zoo.entries.images import IMAGE_MODEL_SETTINGS
from zoo.entry import ModelEntry
from zoo.guides import cvae as guides
from zoo.models import cvae

ENTRY = ModelEntry(
    name="cvae",
    description="label-conditioned VAE, x ~ p(x | z, y) with y one-hot, so that z "
                "carries the style and y the content; q(z | x, y)",
    build_model=cvae.CVAE.for_data,
    guides={"meanfield": guides.MeanFieldGuide.for_data},
    labels=True,
    plots=generation.CVAE_PLOTS,
    figures=("samples", "analogies"),
    **IMAGE_MODEL_SETTINGS,
)
