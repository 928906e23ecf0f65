r"""The label-conditioned variational autoencoder (Kingma et al. 2014, "Semi-supervised learning
with deep generative models", model M2 with observed labels; Sohn et al. 2015).

Generative process, independently for each image n = 1, ..., N with its label y_n in
{0, ..., C - 1}:

    z_n ~ N(0, I_M)
    eta_n = f_theta([z_n, e(y_n)])             (the decoder, ``generation_net``)
    x_nd ~ p(x_nd | eta_nd),   d = 1, ..., D

where e(y) is the one-hot vector of y, ``[C]``, appended to z. Shapes: ``x: [N, D]``,
``y: [N]`` int64, ``z: [N, M]``, ``eta: [N, D]``. The likelihoods and architectures are those
of the VAE (:mod:`zoo.models.vae`): the convolutional decoder takes [z, e(y)] in its first
linear layer.

The label is given, not modelled: the bounds and log-likelihoods of this model are of
log p(x | y). Since y already tells the decoder which digit to draw, the prior's z is free to
carry what the label does not, the style (slant, thickness), and decoding one z under each
label draws the same style as each digit (``zoo plot RUN --kind analogies``).
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
from torch import Tensor

from zoo.models.vae import VAE
from zoo.networks import with_label


class CVAE(VAE):
    """The CVAE of the module docstring: p(z) = N(0, I_M), p(x | z, y) from ``generation_net``.

    ``forward(x, y)`` with ``x: [N, D]`` and ``y: [N]`` has the sites ``"z"`` (``[N, M]``) and
    ``"x"`` (event ``[D]``) inside the plate ``"data"`` at dim -1. ``decode(z, y)`` and
    ``mean(z, y)`` take ``z: [..., N, M]`` and ``y: [N]``.
    """

    def __init__(self, data_dim: int, latent_dim: int, num_classes: int,
                 likelihood: str = "bernoulli", architecture: str = "mlp", *,
                 hidden_dims: Sequence[int] = (200, 200), activation: str | None = None,
                 image_shape: Sequence[int] | None = None):
        super().__init__(data_dim, latent_dim, likelihood, architecture, hidden_dims=hidden_dims,
                         activation=activation, image_shape=image_shape, context_dim=num_classes)
        self.num_classes = num_classes

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_classes={self.num_classes}"

    def decode(self, z: Tensor, y: Tensor) -> dist.Independent:
        """p(x | z, y): batch shape ``z.shape[:-1]``, event shape ``[D]``."""
        return self.observation(self.generation_net(with_label(z, y, self.num_classes)))

    def mean(self, z: Tensor, y: Tensor) -> Tensor:
        """E[x | z, y], ``[..., N, D]``."""
        return self.decode(z, y).mean

    def forward(self, x: Tensor, y: Tensor) -> None:
        """p(x, z | y) = prod_n N(z_n | 0, I_M) p(x_n | f([z_n, e(y_n)]))."""
        self._check(x)
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1))
            pyro.sample("x", self.decode(z, y), obs=x)
