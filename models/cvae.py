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
import torch
from torch import Tensor
from torch.nn.functional import one_hot

from zoo.data import Data
from zoo.errors import ZooError
from zoo.models.vae import VAE, network, resolve_options


def check_labelled(data: Data) -> int:
    """The number of classes C of ``data``; :class:`ZooError` when it has no labels."""
    if data.y_train is None or data.num_classes is None:
        raise ZooError(f"the cvae conditions on class labels, and {data.name} has none; use a "
                       f"labelled data set (digits, mnist, fashion-mnist) or the vae")
    return data.num_classes


def one_hot_labels(y: Tensor, num_classes: int, num_data: int) -> Tensor:
    """e(y_n) for labels ``y: [N]`` of N = ``num_data`` images, ``[N, C]`` int64.

    :class:`ZooError` unless y holds one integer in 0, ..., C - 1 per image: a float label, a
    label out of range (where ``one_hot`` fails, on a GPU with a device-side assert) or a
    single label for many images (which would broadcast silently) is a mistake of the caller.
    """
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ZooError(f"cvae labels y must be integer class indices; got dtype {y.dtype}: "
                       f"pass y.long()")
    if y.shape != (num_data,):
        raise ZooError(f"cvae labels y must have shape [N] = [{num_data}], one label per image "
                       f"of x; got shape {list(y.shape)}: pass one label per image, for "
                       f"example torch.full(({num_data},), label) for a single label")
    if not ((y >= 0) & (y < num_classes)).all():
        raise ZooError(f"cvae labels y must be classes 0 to {num_classes - 1}; got labels from "
                       f"{y.min().item()} to {y.max().item()}: use the labels of the data the "
                       f"model was built for")
    return one_hot(y.long(), num_classes)


def with_label(u: Tensor, y: Tensor, num_classes: int) -> Tensor:
    """[u, e(y)]: ``u: [..., N, I]`` and ``y: [N]`` give ``[..., N, I + C]`` (y checked by
    :func:`one_hot_labels`)."""
    e = one_hot_labels(y, num_classes, u.shape[-2]).to(u.dtype)
    return torch.cat([u, e.expand(*u.shape[:-1], num_classes)], -1)


class CVAE(VAE):
    """The CVAE of the module docstring: p(z) = N(0, I_M), p(x | z, y) from ``generation_net``.

    ``forward(x, y)`` with ``x: [N, D]`` and ``y: [N]`` has the sites ``"z"`` (``[N, M]``) and
    ``"x"`` (event ``[D]``) inside the plate ``"data"`` at dim -1. ``decode(z, y)`` and
    ``mean(z, y)`` take ``z: [..., N, M]`` and ``y: [N]``.
    """

    def __init__(self, data_dim: int, latent_dim: int, num_classes: int,
                 likelihood: str = "bernoulli", architecture: str = "mlp", *,
                 hidden_dims: Sequence[int] | None = None, activation: str | None = None,
                 image_shape: Sequence[int] | None = None):
        super().__init__(data_dim, latent_dim, likelihood, architecture, hidden_dims=hidden_dims,
                         activation=activation, image_shape=image_shape, context_dim=num_classes)
        self.num_classes = num_classes

    @classmethod
    def for_data(cls, data: Data, **options) -> CVAE:
        """The model for labelled ``data`` with the registry's options, initialized from it."""
        model = cls(num_classes=check_labelled(data), **resolve_options(data, **options))
        model.initialize_from_data(data.x_train)
        return model

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_classes={self.num_classes}"

    def decode(self, z: Tensor, y: Tensor) -> dist.Independent:
        """p(x | z, y): batch shape ``z.shape[:-1]``, event shape ``[D]``."""
        return self.observation(network(self, "generation_net")(with_label(z, y, self.num_classes)))

    def mean(self, z: Tensor, y: Tensor) -> Tensor:
        """E[x | z, y], ``[..., N, D]``."""
        return self.decode(z, y).mean

    def forward(self, x: Tensor, y: Tensor) -> None:
        """p(x, z | y) = prod_n N(z_n | 0, I_M) p(x_n | f([z_n, e(y_n)]))."""
        self._check(x)
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1))
            pyro.sample("x", self.decode(z, y), obs=x)
