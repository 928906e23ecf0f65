"""The registry entry of the exponential-normal teaching model (:mod:`zoo.models.expnormal`)."""

from __future__ import annotations

from functools import partial

from zoo.data import Data
from zoo.entry import TO_CONVERGENCE, ModelEntry, from_data
from zoo.figures import expnormal as figures
from zoo.guides import expnormal as guides
from zoo.models.expnormal import ExpNormal


def build_model(data: Data) -> ExpNormal:
    return ExpNormal(data.data_dim)


ENTRY = ModelEntry(
    name="expnormal",
    description="teaching model z ~ Exponential(1), x | z ~ N(z, 1): exact posterior "
                "N(x - 1, 1) truncated to z >= 0, exact marginal through the normal CDF",
    build_model=build_model,
    guides={"lognormal": partial(from_data, guides.LogNormalGuide),
            "normal": partial(from_data, guides.NormalGuide)},
    default_data="synthetic-expnormal",
    train=TO_CONVERGENCE,
    demo={"steps": 1500},
    plots={"posterior-fit": figures.plot_expnormal_fits},
    figures=("posterior-fit",),
)
