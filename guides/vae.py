r"""The amortized guide of the VAE (:mod:`zoo.models.vae`): the encoder.

    q(z_n | x_n) = N(mu(x_n), diag sigma(x_n)^2),
    (mu, sigma)(x) = (W_mu h(x) + c_mu,  softplus(W_sigma h(x) + c_sigma) + SIGMA_MIN),

where h (``recognition_net``) is the MLP or the convolutional stack matching the decoder's
architecture: the same hidden sizes (784-200-200 with tanh by default for 28 x 28 images,
Burda et al. 2015), or Conv(1 -> 32) -> act -> Conv(32 -> 64) -> act, each convolution
halving the sides of the image. Shapes: ``x: [N, D] -> mu, sigma: [N, M]``; any leading shape
``[..., D]`` works.

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
import torch
from pyro.nn import PyroModule
from torch import Tensor, nn
from torch.nn.functional import softplus

from zoo.contract import DISTRIBUTION
from zoo.data import Data
from zoo.models.vae import (
    ACTIVATIONS,
    CONV_CHANNELS,
    DEFAULT_ACTIVATION,
    default_sizes,
    mlp,
    network,
    resolve_options,
)

SIGMA_MIN = 1e-4


class Encoder(nn.Module):
    """``x: [..., D]`` (with extra inputs ``c: [..., C]``, e.g. a one-hot label) ->
    ``(mu, sigma)``, each ``[..., M]``. The extra inputs join x at the input of the MLP, and the
    flattened features after the convolutions."""

    def __init__(self, data_dim: int, latent_dim: int, architecture: str = "mlp",
                 hidden_dims: Sequence[int] = (), activation: str | None = None,
                 image_shape: Sequence[int] | None = None, context_dim: int = 0):
        super().__init__()
        activation = activation or DEFAULT_ACTIVATION[architecture]
        self.image_shape = None if image_shape is None else tuple(image_shape)
        if architecture == "mlp":
            self.context_at_input = True
            self.net = mlp([data_dim + context_dim, *hidden_dims], activation,
                           last_activation=True)
            features = hidden_dims[-1] if hidden_dims else data_dim + context_dim
        else:
            self.context_at_input = False
            c1, c2 = CONV_CHANNELS
            self.net = nn.Sequential(
                nn.Unflatten(-1, (1, *self.image_shape)),
                nn.Conv2d(1, c1, 4, stride=2, padding=1), ACTIVATIONS[activation](),
                nn.Conv2d(c1, c2, 4, stride=2, padding=1), ACTIVATIONS[activation](),
                nn.Flatten(-3))
            features = c2 * data_dim // 16 + context_dim
        self.head = nn.Linear(features, 2 * latent_dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        batch = x.shape[:-1]
        if context is not None and self.context_at_input:
            x = torch.cat([x, context], -1)
        h = self.net(x.reshape(-1, x.shape[-1]))  # convolutions take one batch dimension
        if context is not None and not self.context_at_input:
            h = torch.cat([h, context.reshape(-1, context.shape[-1])], -1)
        mu, raw = self.head(h).reshape(*batch, -1).chunk(2, -1)
        return mu, softplus(raw) + SIGMA_MIN


class MeanFieldGuide(PyroModule):
    """q(z_n | x_n) = N(mu(x_n), diag sigma(x_n)^2) with the encoder ``recognition_net``;
    ``hidden_dims`` None takes the sizes of :func:`zoo.models.vae.default_sizes`."""

    offers = frozenset({DISTRIBUTION})

    def __init__(self, data_dim: int, latent_dim: int, architecture: str = "mlp", *,
                 hidden_dims: Sequence[int] | None = None, activation: str | None = None,
                 image_shape: Sequence[int] | None = None, context_dim: int = 0):
        super().__init__()
        self.data_dim = data_dim
        self.latent_dim = latent_dim
        if hidden_dims is None:
            hidden_dims = default_sizes(data_dim)[1]
        self.recognition_net = Encoder(data_dim, latent_dim, architecture, hidden_dims,
                                       activation, image_shape, context_dim)

    @classmethod
    def for_data(cls, data: Data, **options) -> MeanFieldGuide:
        """The guide matching :meth:`zoo.models.vae.VAE.for_data` with the same options (the
        likelihood is the model's alone)."""
        arguments = resolve_options(data, **options)
        del arguments["likelihood"]
        return cls(**arguments)

    def distribution(self, x: Tensor) -> dist.Independent:
        """q(z | x) as ``Independent(Normal(mu(x), sigma(x)), 1)``: batch [N], event [M]."""
        return dist.Normal(*network(self, "recognition_net")(x)).to_event(1)

    def forward(self, x: Tensor) -> None:
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", self.distribution(x))
