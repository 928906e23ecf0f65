"""The registry entry of probabilistic PCA (:mod:`zoo.models.ppca`)."""

from __future__ import annotations

from functools import partial

import torch

from zoo.data import Data
from zoo.entry import TO_CONVERGENCE, ModelEntry, from_data
from zoo.guides import ppca as guides
from zoo.models.ppca import PPCA


def build_model(data: Data, *, latent_dim: int, init: str) -> PPCA:
    """PPCA(D, latent_dim) started as ``init`` says (:meth:`~zoo.models.ppca.PPCA.initialize`)."""
    model = PPCA(data.data_dim, latent_dim)
    model.initialize(data.x_train, init)
    return model


def build_guide(guide_class: type, data: Data, *, init: str, **options) -> torch.nn.Module:
    """A PPCA guide initialized from the training data; ``init`` concerns the model alone."""
    return from_data(guide_class, data, **options)


ENTRY = ModelEntry(
    name="ppca",
    description="probabilistic PCA, x = W z + b + eps, with its closed-form marginal, "
                "posterior and maximum-likelihood solution",
    build_model=build_model,
    guides={"meanfield": partial(build_guide, guides.MeanFieldGuide),
            "full": partial(build_guide, guides.FullGuide)},
    default_data="synthetic-ppca",
    options={"latent_dim": 2, "init": "data"},
    train=TO_CONVERGENCE,
    demo={"steps": 1500},
)
