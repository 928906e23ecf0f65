"""The registry entry of probabilistic PCA (:mod:`zoo.models.ppca`)."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import Tensor

from zoo.data import Data
from zoo.entries.ppca_escape import before_stop
from zoo.entry import TO_CONVERGENCE, ModelEntry, from_data
from zoo.errors import ZooError
from zoo.guides import ppca as guides
from zoo.models.ppca import PPCA, maximum_likelihood

INITS = ("data", "closed-form", "closed-form-rotated")
"""How :func:`initialize` can start the parameters (``zoo train ppca --init``)."""


def random_rotation(latent_dim: int, generator: torch.Generator | None = None) -> Tensor:
    """A random orthogonal ``[M, M]`` matrix, uniform (Haar) over the orthogonal group: the Q of
    the QR decomposition of a standard Gaussian matrix, with the signs of R's diagonal moved
    into Q so that the decomposition is unique (Mezzadri 2007). Drawn in float64."""
    A = torch.randn(latent_dim, latent_dim, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(A)
    return Q * R.diagonal().sign()


@torch.no_grad()
def initialize(model: PPCA, x: Tensor, init: str = "data") -> None:
    """Start ``model`` from ``x: [N, D]`` as ``init`` says (one of :data:`INITS`):

    - ``data``: :meth:`~zoo.models.ppca.PPCA.initialize_from_data` (small random W at the
      data's scale);
    - ``closed-form``: the maximum-likelihood solution, whose posterior covariance is
      diagonal (see :mod:`zoo.models.ppca`);
    - ``closed-form-rotated``: the maximum-likelihood W times a random rotation R (drawn
      from torch's global generator, which zoo seeds with the run's seed): the same
      likelihood, a correlated posterior.
    """
    if init not in INITS:
        raise ZooError(f"unknown --init '{init}' for ppca; choose one of: {', '.join(INITS)}")
    if init == "data":
        model.initialize_from_data(x)
        return
    W, b, sigma = maximum_likelihood(x, model.latent_dim)
    model.record_scale(x)
    if init == "closed-form-rotated":
        W = W @ random_rotation(model.latent_dim).to(W)
    model.set_parameters(W, b, sigma)


def build_model(data: Data, *, latent_dim: int, init: str) -> PPCA:
    """PPCA(D, latent_dim) started as ``init`` says (:func:`initialize`)."""
    model = PPCA(data.data_dim, latent_dim)
    initialize(model, data.x_train, init)
    return model


def build_guide(guide_class: type, data: Data, *, init: str, **options) -> torch.nn.Module:
    """A PPCA guide initialized from the training data; ``init`` concerns the model alone."""
    return from_data(guide_class, data, **options)


FULL_START = 10.0
"""How many times larger the full guide's runs start W than :meth:`PPCA.initialize_from_data`
draws it (:func:`start_full`)."""


@torch.no_grad()
def start_full(model: PPCA, guide: guides.FullGuide, *, init: str, **options) -> None:
    """Tie the full guide's column lengths to the model's (:meth:`FullGuide.tie_lengths
    <zoo.guides.ppca.FullGuide.tie_lengths>`) and, for ``--init data``, start W ten times larger:
    W ~ N(0, s^2) entrywise rather than N(0, (s / 10)^2).

    Why larger: the small random W is near a saddle of the likelihood, where every column is 0.
    A column grows away from it at a rate set by the ratio of its direction's variance to the
    noise variance; for a weak direction (a few times the noise) that growth is slow while
    sigma^2 absorbs the direction's variance, the loss is flat, and the stopping rule can call
    the saddle converged. With lengths tied, the larger start costs some tables more steps (7,200
    more on ``random-101`` of ``benchmarks/ppca_convergence.py``) and none more than 1e-4 nats
    of gap. The mean-field guide keeps the small start and untied lengths, on which its tables
    measure best. The closed-form inits are left exact."""
    guide.tie_lengths(model)
    if init == "data":
        model.V.mul_(FULL_START)


TRAIN: dict[str, Any] = dict(
    TO_CONVERGENCE, steps=50000, batch_size=4096, passes=50, lr=0.015, tolerance=5e-5,
    patience=3, average_iterates=True)
"""PPCA's tables are small enough for full-batch steps (up to 4096 rows a batch), whose
gradients carry no minibatch noise; an epoch is 50 of them. Adam starts at 0.015 and is
halved at each plateau (two windows of 3 epochs) down to 0.015 / 8, where training stops once
the loss's trend over the second half of at least 12 epochs is below 5e-5 nats per point per
epoch with 99% confidence, or after 50000 steps. Each epoch ends at the mean of its 50
iterates. On a table whose noise is small against its loadings (a posterior much narrower than
the prior), Adam's steps keep the encoder jittering around the posterior by tenths of a nat per
point, which the mean removes, and the model's largest columns approach their length slowly,
by about 1e-4 nats per epoch 0.01 nats from the optimum: the tolerance is set below that
(``benchmarks/ppca_convergence.py``)."""

ENTRY = ModelEntry(
    name="ppca",
    description="probabilistic PCA, x = W z + b + eps, with its closed-form marginal, "
                "posterior and maximum-likelihood solution",
    build_model=build_model,
    guides={"meanfield": partial(build_guide, guides.MeanFieldGuide),
            "full": partial(build_guide, guides.FullGuide)},
    default_data="synthetic-ppca",
    options={"latent_dim": 2, "init": "data"},
    train=TRAIN,
    demo={"steps": 1500},
    start_guide={"full": start_full},
    before_stop=before_stop,
)
