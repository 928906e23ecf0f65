"""The registry: model name -> how to build the model and its guides, its default data and
settings. Scripts and the ``zoo`` command look models up here instead of dispatching on names.

Adding a model to the zoo means writing ``models/X.py`` and ``guides/X.py`` and one
:class:`ModelEntry` below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from zoo.data import Data
from zoo.errors import ZooError
from zoo.guides import ppca as ppca_guides
from zoo.models import ppca


@dataclass(frozen=True)
class ModelEntry:
    """How to build one model of the zoo and its guides.

    ``build_model(data, **options)`` and each ``guides[name](data, **options)`` receive the
    loaded :class:`~zoo.data.Data` and the model's options (``options`` holds their defaults);
    the first guide is the default. ``train`` holds default :class:`~zoo.train.TrainSettings`
    values and ``demo`` the overrides for the short runs of ``zoo demo``; ``objective`` the
    default objective configuration for each guide name (``{"name": "elbo"}`` for guides
    not listed). ``labels`` says whether
    model and guide take the labels ``y`` after ``x``. ``binarized(options)`` says whether the
    model sees binary images: training then draws them afresh each epoch from the grey levels,
    evaluation uses one seeded draw. ``plots`` maps each ``zoo plot --kind`` name to a function
    ``plot(experiment, path) -> path`` drawing that figure for a trained run.
    """

    name: str
    description: str
    build_model: Callable[..., torch.nn.Module]
    guides: dict[str, Callable[..., torch.nn.Module]]
    default_data: str
    options: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    demo: dict[str, Any] = field(default_factory=dict)
    objectives: dict[str, dict[str, Any]] = field(default_factory=dict)
    labels: bool = False
    binarized: Callable[[dict[str, Any]], bool] = lambda options: False
    plots: dict[str, Callable[..., Any]] = field(default_factory=dict)

    @property
    def default_guide(self) -> str:
        return next(iter(self.guides))

    def inputs(self, data: Data, split: str = "train") -> tuple[torch.Tensor, ...] | None:
        """The tensors model and guide are called with: ``(x,)``, or ``(x, y)`` with labels."""
        x, y = (data.x_train, data.y_train) if split == "train" else (data.x_test, data.y_test)
        if x is None:
            return None
        return (x, y) if self.labels else (x,)


def _from_data(module_class: type, data: Data, **options) -> torch.nn.Module:
    """``module_class(D, **options)`` initialized from the training data."""
    module = module_class(data.data_dim, **options)
    module.initialize_from_data(data.x_train)
    return module


MODELS: dict[str, ModelEntry] = {
    entry.name: entry for entry in [
        ModelEntry(
            name="ppca",
            description="probabilistic PCA, x = W z + b + eps, with its closed-form marginal, "
                        "posterior and maximum-likelihood solution",
            build_model=partial(_from_data, ppca.PPCA),
            guides={"meanfield": partial(_from_data, ppca_guides.MeanFieldGuide),
                    "full": partial(_from_data, ppca_guides.FullGuide)},
            default_data="synthetic-ppca",
            options={"latent_dim": 2},
            train={"steps": 3000, "batch_size": 256, "lr": 0.01, "lr_schedule": "cosine"},
            demo={"steps": 1500},
        ),
    ]
}


def get_model(name: str) -> ModelEntry:
    """The registry entry for ``name``; unknown names list the valid ones."""
    if name not in MODELS:
        raise ZooError(f"unknown model '{name}'; choose one of: {', '.join(MODELS)}")
    return MODELS[name]


def build(entry: ModelEntry, guide: str | None, data: Data, options: dict[str, Any]
          ) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Build the model and the named guide (the default when None) for ``data``."""
    guide = guide or entry.default_guide
    if guide not in entry.guides:
        raise ZooError(f"unknown guide '{guide}' for model {entry.name}; "
                       f"choose one of: {', '.join(entry.guides)}")
    unknown = set(options) - set(entry.options)
    if unknown:
        flags = ", ".join("--" + name.replace("_", "-") for name in sorted(unknown))
        raise ZooError(f"{flags} does not apply to model {entry.name}")
    options = {**entry.options, **options}
    return entry.build_model(data, **options), entry.guides[guide](data, **options)
