"""The registry entry of the label-conditioned VAE (:mod:`zoo.models.cvae`): model and guide
built for a labelled data set, and the figures of :mod:`zoo.figures.images`."""

from __future__ import annotations

from zoo.data import Data
from zoo.entries.images import (
    IMAGE_MODEL_SETTINGS,
    guide_options,
    initialize_from_data,
    resolve_options,
)
from zoo.entry import ModelEntry
from zoo.errors import ZooError
from zoo.figures.images import CVAE_PLOTS
from zoo.guides.cvae import MeanFieldGuide
from zoo.models.cvae import CVAE


def check_labelled(data: Data) -> int:
    """The number of classes C of ``data``; :class:`ZooError` when it has no labels."""
    if data.y_train is None or data.num_classes is None:
        raise ZooError(f"the cvae conditions on class labels, and {data.name} has none; use a "
                       f"labelled data set (digits, mnist, fashion-mnist) or the vae")
    return data.num_classes


def build_model(data: Data, **options) -> CVAE:
    """The CVAE for labelled ``data`` with the registry's options, the decoder started from
    the data."""
    model = CVAE(num_classes=check_labelled(data), **resolve_options(data, **options))
    initialize_from_data(model, data.x_train)
    return model


def build_guide(data: Data, **options) -> MeanFieldGuide:
    """The guide matching :func:`build_model` with the same options."""
    return MeanFieldGuide(num_classes=check_labelled(data), **guide_options(data, **options))


ENTRY = ModelEntry(
    name="cvae",
    description="label-conditioned VAE, x ~ p(x | z, y) with y one-hot, so that z "
                "carries the style and y the content; q(z | x, y)",
    build_model=build_model,
    guides={"meanfield": build_guide},
    labels=True,
    plots=CVAE_PLOTS,
    figures=("samples", "analogies"),
    **IMAGE_MODEL_SETTINGS,
)
