"""What the registry knows about one model: :class:`ModelEntry`, and the settings that several
entries share. Each model's entry lives in ``zoo/entries/<name>.py``, beside its adapter code
(option checks, building from data, initialization, figures); ``zoo/registry.py`` lists them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from zoo.data import Data


@dataclass(frozen=True)
class ModelEntry:
    """How to build one model of the zoo and its guides.

    ``build_model(data, **options)`` and each ``guides[name](data, **options)`` receive the
    loaded :class:`~zoo.data.Data` and the model's options (``options`` holds their defaults);
    the first guide is the default. What model and guide offer beyond the contract is declared
    on their classes (``offers``, see :mod:`zoo.contract`). ``train`` holds default
    :class:`~zoo.settings.TrainSettings` values and ``demo`` the overrides for the short runs of
    ``zoo demo``; ``objectives`` the default objective configuration for each guide name
    (``{"name": "elbo"}`` for guides not listed). ``labels`` says whether model and guide take
    the labels ``y`` after ``x``. ``binarized(options)`` says whether the model sees binary
    images: training then draws them afresh each epoch from the grey levels, evaluation uses one
    seeded draw. ``metrics(model, x) -> dict`` adds the model's own numbers to ``zoo evaluate``
    (None: none). ``plots`` maps each ``zoo plot --kind`` name to a function
    ``plot(experiment, path) -> path`` drawing that figure for a trained run; ``figures`` names
    the kinds drawn after every training run, beside the loss curves; ``images`` says that
    those figures show images, so that they are left out for data without an image shape.
    ``start_guide[name](model, guide, **options)``, for the guides it names, starts the guide
    (and may adjust the model's start) from the model as built, before any checkpoint is loaded
    over both. ``before_stop(model, guide, *inputs) -> bool``, for models that can tell a
    false stop (a saddle point, a valley that gradient steps cross too slowly) from the optimum,
    is asked whenever training to convergence would stop (:func:`zoo.train.fit`): it returns
    True after moving model and guide off it, and training goes on.
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
    metrics: Callable[..., dict[str, float]] | None = None
    plots: dict[str, Callable[..., Any]] = field(default_factory=dict)
    figures: tuple[str, ...] = ()
    images: bool = False
    start_guide: dict[str, Callable[..., None]] = field(
        default_factory=dict)
    before_stop: Callable[..., bool] | None = None

    @property
    def default_guide(self) -> str:
        return next(iter(self.guides))

    def inputs(self, data: Data, split: str = "train") -> tuple[torch.Tensor, ...] | None:
        """The tensors model and guide are called with: ``(x,)``, or ``(x, y)`` with labels."""
        x, y = (data.x_train, data.y_train) if split == "train" else (data.x_test, data.y_test)
        if x is None:
            return None
        return (x, y) if self.labels else (x,)


def from_data(module_class: type, data: Data, **options) -> torch.nn.Module:
    """``module_class(D, **options)`` initialized from the training data
    (``initialize_from_data(x_train)``)."""
    module = module_class(data.data_dim, **options)
    module.initialize_from_data(data.x_train)
    return module


TO_CONVERGENCE: dict[str, Any] = dict(
    steps=20000, batch_size=256, lr=0.01, lr_schedule="plateau", tolerance=1e-5, patience=25,
    threads=1)
"""Training to convergence, the default of the small models whose data fit in memory: Adam at
0.01 per step (in units of the data's scale where the model declares one), halved at each
plateau of the whole-data loss (no improvement above 1e-5 nats per point per epoch between two
windows of 25 epochs), down to lr / 8, where training stops once the loss's trend over the
second half of at least 100 epochs is below 1e-5 with 99% confidence, or after 20000 steps
(:func:`zoo.convergence.converged`). One CPU thread: their steps are too small for torch's
threads to pay for themselves, and on a busy machine extra threads only wait for cores
(``benchmarks/threads.py``)."""
