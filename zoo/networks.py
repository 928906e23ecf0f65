r"""The neural networks that the VAE and the CVAE (:mod:`zoo.models.vae`, :mod:`zoo.models.cvae`)
share with their guides (:mod:`zoo.guides.vae`, :mod:`zoo.guides.cvae`).

- :func:`mlp`: Linear -> act -> ... -> Linear over given sizes.
- :class:`Decoder`: ``u: [..., I] -> eta: [..., D]``, eta = f(u) + b, where u is z (I = M) or
  z with the one-hot label appended (the CVAE).
- :class:`Encoder`: ``x: [..., D] -> (mu, sigma): [..., M]``, the guide's
  (mu, sigma)(x) = (W_mu h(x) + c_mu, softplus(W_sigma h(x) + c_sigma) + ``SIGMA_MIN``).
- :func:`one_hot_labels`, :func:`with_label`: the label y as the extra input e(y) of both.
- :class:`NetworkAttribute`: how a model or guide holds its network so that reading it is cheap.

Two architectures: ``mlp`` (the MLPs of Burda et al. 2015, tanh by default) and ``conv``, for
images whose sides are multiples of 4: the encoder's Conv(1 -> 32) -> act -> Conv(32 -> 64) ->
act, each convolution halving the sides, and the decoder's mirror image,
Linear(I, 64 h w) -> act -> ConvT(64 -> 32) -> act -> ConvT(32 -> 1) with (h, w) = (H / 4, W / 4),
ReLU by default.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.functional import one_hot, softplus

from zoo.errors import ZooError

ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU,
                                           "softplus": nn.Softplus}
ARCHITECTURES = ("mlp", "conv")
DEFAULT_ACTIVATION = {"mlp": "tanh", "conv": "relu"}
CONV_CHANNELS = (32, 64)
"""Channels after the first and second convolution of the encoder (the decoder mirrors them)."""
SIGMA_MIN = 1e-4
"""Lower bound of the encoder's scales sigma, so log q(z | x) stays bounded when the encoder
becomes very sure."""


class NetworkAttribute:
    """A class attribute through which a ``PyroModule`` reads its plain ``nn.Module`` child of
    the same name, as in ``generation_net = NetworkAttribute()`` in the class body and
    ``self.generation_net = Decoder(...)`` in ``__init__``.

    Why: ``PyroModule`` reads its children through its ``__getattr__``, which sends one
    ``pyro.param`` message through Pyro's effect handlers for every tensor of a plain child, on
    every read, for Pyro's global parameter store (which cannot train such children in the
    zoo's module-local mode anyway): an eager training step of the digits VAE took 1.27 times
    as long through the hook (``benchmarks/network_access.py``). Python consults
    ``__getattr__`` only when ordinary lookup fails, and this class attribute makes ordinary
    lookup succeed: it returns the child from ``named_children()``. Nothing here needs the
    messages: the engine optimizes ``module.parameters()``.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, module: nn.Module | None, owner: type | None = None):
        if module is None:
            return self
        return dict(module.named_children())[self.name]


def mlp(sizes: Sequence[int], activation: str, *, last_activation: bool) -> nn.Sequential:
    """Linear layers between consecutive ``sizes`` with ``activation`` between them (and after
    the last one when ``last_activation``)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if last_activation or i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class Decoder(nn.Module):
    """eta = f(u) + b: ``u: [..., I] -> eta: [..., D]``, with a learned bias per pixel,
    ``b: [D]``. ``hidden_dims`` applies to ``mlp`` only; ``image_shape`` (H, W) to ``conv``."""

    def __init__(self, input_dim: int, data_dim: int, architecture: str = "mlp",
                 hidden_dims: Sequence[int] = (), activation: str | None = None,
                 image_shape: Sequence[int] | None = None):
        super().__init__()
        activation = activation or DEFAULT_ACTIVATION[architecture]
        if architecture == "mlp":
            self.net = mlp([input_dim, *hidden_dims, data_dim], activation, last_activation=False)
        else:
            c1, c2 = CONV_CHANNELS
            h, w = (side // 4 for side in image_shape)
            self.net = nn.Sequential(
                nn.Linear(input_dim, c2 * h * w), ACTIVATIONS[activation](),
                nn.Unflatten(-1, (c2, h, w)),
                nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1), ACTIVATIONS[activation](),
                nn.ConvTranspose2d(c1, 1, 4, stride=2, padding=1, bias=False),
                nn.Flatten(-3))
        self.bias = nn.Parameter(torch.zeros(data_dim))

    def forward(self, u: Tensor) -> Tensor:
        eta = self.net(u.reshape(-1, u.shape[-1]))  # convolutions take one batch dimension
        return eta.reshape(*u.shape[:-1], -1) + self.bias


class Encoder(nn.Module):
    """``x: [..., D]`` (with extra inputs ``c: [..., C]``, e.g. a one-hot label) ->
    ``(mu, sigma)``, each ``[..., M]``: mu = W_mu h + c_mu and
    sigma = softplus(W_sigma h + c_sigma) + ``SIGMA_MIN`` on the features h of the MLP or the
    convolutions. The extra inputs join x at the input of the MLP, and the flattened features
    after the convolutions.

    The scale grows at most linearly in the network's output (softplus), not exponentially: an
    ``exp`` can overflow after one large step and turn the ELBO into NaN."""

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
