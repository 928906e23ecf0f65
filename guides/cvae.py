r"""The amortized guide of the CVAE (:mod:`zoo.models.cvae`): an encoder that sees the label.

    q(z_n | x_n, y_n) = N(mu(x_n, y_n), diag sigma(x_n, y_n)^2),

with the encoder of the VAE's guide (:mod:`zoo.guides.vae`, :class:`zoo.networks.Encoder`)
given the one-hot label e(y_n) as extra input (at the input of the MLP, after the convolutions
of the convolutional stack). Because the label is given, the encoder need not spend z on which
digit x is, only on how it is drawn. Shapes: ``x: [N, D]``, ``y: [N]`` int64
``-> mu, sigma: [N, M]``.

``forward(x, y)`` mirrors the model: the site ``"z"``, ``[N, M]``, inside the plate ``"data"``
of size N at dim -1. ``distribution(x, y)`` returns q(z | x, y) itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
from pyro.nn import PyroModule
from torch import Tensor

from zoo.contract import DISTRIBUTION
from zoo.networks import Encoder, NetworkAttribute, one_hot_labels


class MeanFieldGuide(PyroModule):
    """q(z_n | x_n, y_n) = N(mu(x_n, y_n), diag sigma(x_n, y_n)^2) with the encoder
    ``recognition_net``."""

    offers = frozenset({DISTRIBUTION})
    recognition_net = NetworkAttribute()  # read cheaply: see zoo.networks.NetworkAttribute

    def __init__(self, data_dim: int, latent_dim: int, num_classes: int,
                 architecture: str = "mlp", *, hidden_dims: Sequence[int] = (200, 200),
                 activation: str | None = None, image_shape: Sequence[int] | None = None):
        super().__init__()
        self.data_dim = data_dim
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        self.recognition_net = Encoder(data_dim, latent_dim, architecture, hidden_dims,
                                       activation, image_shape, context_dim=num_classes)

    def distribution(self, x: Tensor, y: Tensor) -> dist.Independent:
        """q(z | x, y) as ``Independent(Normal(mu, sigma), 1)``: batch [N], event [M]."""
        e = one_hot_labels(y, self.num_classes, x.shape[-2]).to(x.dtype)
        return dist.Normal(*self.recognition_net(x, e)).to_event(1)

    def forward(self, x: Tensor, y: Tensor) -> None:
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", self.distribution(x, y))
