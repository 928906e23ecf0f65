r"""The amortized guide of the VAE (:mod:`zoo.models.vae`): the encoder.

    q(z_n | x_n) = N(mu(x_n), diag sigma(x_n)^2),
    (mu, sigma)(x) = (W_mu h(x) + c_mu,  softplus(W_sigma h(x) + c_sigma) + SIGMA_MIN),

where h (``recognition_net``, :class:`zoo.networks.Encoder`) is the MLP or the convolutional
stack matching the decoder's architecture: the same hidden sizes (784-200-200 with tanh by
default for 28 x 28 images, Burda et al. 2015), or Conv(1 -> 32) -> act -> Conv(32 -> 64) -> act,
each convolution halving the sides of the image. Shapes: ``x: [N, D] -> mu, sigma: [N, M]``;
any leading shape ``[..., D]`` works.

The scale grows at most linearly in the network's output (softplus), not exponentially: an
``exp`` can overflow after one large step and turn the ELBO into NaN. ``SIGMA_MIN`` keeps
log q(z | x) bounded when the encoder becomes very sure.

``forward(x)`` mirrors the model: the site ``"z"``, ``[N, M]``, inside the plate ``"data"`` of
size N at dim -1. ``distribution(x)`` returns q(z | x) itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
from pyro.nn import PyroModule
from torch import Tensor

from zoo.contract import DISTRIBUTION
from zoo.networks import Encoder, NetworkAttribute


class MeanFieldGuide(PyroModule):
    """q(z_n | x_n) = N(mu(x_n), diag sigma(x_n)^2) with the encoder ``recognition_net``;
    ``hidden_dims`` are its hidden sizes (``mlp`` only), by default those of Burda et al. (2015).
    """

    offers = frozenset({DISTRIBUTION})
    recognition_net = NetworkAttribute()  # read cheaply: see zoo.networks.NetworkAttribute

    def __init__(self, data_dim: int, latent_dim: int, architecture: str = "mlp", *,
                 hidden_dims: Sequence[int] = (200, 200), activation: str | None = None,
                 image_shape: Sequence[int] | None = None):
        super().__init__()
        self.data_dim = data_dim
        self.latent_dim = latent_dim
        self.recognition_net = Encoder(data_dim, latent_dim, architecture, hidden_dims,
                                       activation, image_shape)

    def distribution(self, x: Tensor) -> dist.Independent:
        """q(z | x) as ``Independent(Normal(mu(x), sigma(x)), 1)``: batch [N], event [M]."""
        return dist.Normal(*self.recognition_net(x)).to_event(1)

    def forward(self, x: Tensor) -> None:
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", self.distribution(x))
