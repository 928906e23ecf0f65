r"""The variational autoencoder (Kingma & Welling, 2014; Rezende, Mohamed & Wierstra, 2014).

Generative process, independently for each image n = 1, ..., N:

    z_n ~ N(0, I_M)
    eta_n = f_theta(z_n)                       (the decoder, ``generation_net``)
    x_nd ~ p(x_nd | eta_nd),   d = 1, ..., D

Shapes: ``x: [N, D]`` (images flattened row by row, pixels in [0, 1]), ``z: [N, M]``,
``eta: [N, D]``, one decoder output per pixel. The decoder accepts any leading batch shape,
``z: [..., M] -> eta: [..., D]``, so K particles per image, ``z: [K, N, M]``, decode in one call.

Likelihoods p(x_nd | eta_nd) (``likelihood``):

- ``bernoulli`` (default): x_nd ~ Bernoulli(sigmoid(eta_nd)), for binary images. Training
  binarizes the grey levels afresh each epoch (dynamic binarization, Burda et al. 2015) and
  evaluation uses one seeded binarization. The values are not checked: on grey levels the
  log-probability is the negative binary cross-entropy, the loss of Pyro's VAE tutorial, which
  is not a normalized density over [0, 1].
- ``continuous-bernoulli``: x_nd ~ CB(sigmoid(eta_nd)), the normalized density on [0, 1]
  proportional to lambda^x (1 - lambda)^(1 - x) (Loaiza-Ganem & Cunningham, 2019), for grey
  levels.
- ``gaussian``: x_nd ~ N(eta_nd, s^2) with one learned scale s > ``MIN_SCALE`` shared by all
  pixels (the sigma-VAE of Rybkin et al., 2021), for grey levels or any real table.

Architectures (``architecture``):

- ``mlp`` (default): f = Linear -> act -> ... -> Linear over the hidden sizes. The defaults
  follow Burda et al. (2015) for 28 x 28 images, 784-200-200-50 with tanh, and are smaller for
  small inputs (``default_sizes``).
- ``conv``: for images whose sides are multiples of 4, f = Linear(M, 64 h w) -> act ->
  ConvT(64 -> 32) -> act -> ConvT(32 -> 1), each transposed convolution doubling the sides from
  (h, w) = (H / 4, W / 4) back to (H, W); ReLU by default.

Both end with a learned bias per pixel, ``b: [D]``, which ``initialize_from_data`` sets to the
logit of the mean training image (the mean image itself for ``gaussian``), so training starts
from the best decoder that ignores z.

The evidence lower bound is

    ELBO(x_n) = E_q(z | x_n)[log p(x_n | z)] - KL(q(z | x_n) || N(0, I)),

with the amortized guide q(z | x) = N(mu(x), diag sigma(x)^2) of :mod:`zoo.guides.vae`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam
from torch import Tensor, nn
from torch.distributions import constraints

from zoo.contract import DECODER
from zoo.data import Data
from zoo.errors import ZooError

LIKELIHOODS = ("bernoulli", "continuous-bernoulli", "gaussian")
ARCHITECTURES = ("mlp", "conv")
ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU,
                                           "softplus": nn.Softplus}
DEFAULT_ACTIVATION = {"mlp": "tanh", "conv": "relu"}
CONV_CHANNELS = (32, 64)
"""Channels after the first and second convolution of the encoder (the decoder mirrors them)."""
MIN_SCALE = 1e-3
"""Lower bound of the Gaussian likelihood's scale s, so log p(x | z) stays bounded."""
_PIXEL_EPS = 1e-3


def default_sizes(data_dim: int) -> tuple[int, tuple[int, ...]]:
    """The default latent size M and hidden sizes for data of D columns.

    D >= 784 (28 x 28 images): Burda et al. (2015), M = 50 and two hidden layers of 200.
    Smaller inputs (the 8 x 8 digits): M = min(8, D // 2) and two hidden layers of 64.
    """
    if data_dim >= 784:
        return 50, (200, 200)
    return max(1, min(8, data_dim // 2)), (64, 64)


def check_options(data_dim: int, latent_dim: int, likelihood: str, architecture: str,
                  image_shape: Sequence[int] | None) -> None:
    """Raise :class:`ZooError` for an option out of range, naming the flag and the fix."""
    if likelihood not in LIKELIHOODS:
        raise ZooError(f"unknown --likelihood '{likelihood}'; choose one of: "
                       f"{', '.join(LIKELIHOODS)}")
    if architecture not in ARCHITECTURES:
        raise ZooError(f"unknown --architecture '{architecture}'; choose one of: "
                       f"{', '.join(ARCHITECTURES)}")
    if latent_dim < 1:
        raise ZooError(f"--latent-dim must be at least 1; got {latent_dim}")
    if architecture == "conv":
        if image_shape is None or len(image_shape) != 2:
            raise ZooError("--architecture conv needs image data (digits, mnist, "
                           "fashion-mnist); use --architecture mlp for tables")
        if any(side % 4 for side in image_shape):
            raise ZooError(f"--architecture conv needs image sides that are multiples of 4; "
                           f"got {tuple(image_shape)}: use --architecture mlp")
        if image_shape[0] * image_shape[1] != data_dim:
            raise ZooError(f"images of shape {tuple(image_shape)} do not have D = {data_dim} "
                           f"pixels")


def resolve_options(data: Data, latent_dim: int | None = None, likelihood: str = "bernoulli",
                    architecture: str = "mlp") -> dict[str, Any]:
    """The constructor arguments of model and guide for ``data``: the defaults of
    :func:`default_sizes` where ``latent_dim`` is None, checked against the data (the Bernoulli
    likelihoods need values in [0, 1])."""
    default_latent_dim, hidden_dims = default_sizes(data.data_dim)
    latent_dim = default_latent_dim if latent_dim is None else latent_dim
    check_options(data.data_dim, latent_dim, likelihood, architecture, data.image_shape)
    x = data.x_train
    if likelihood != "gaussian" and (x.min() < 0 or x.max() > 1):
        raise ZooError(f"--likelihood {likelihood} needs data in [0, 1]; {data.name} ranges over "
                       f"[{x.min():.3g}, {x.max():.3g}]: use --likelihood gaussian")
    return {"data_dim": data.data_dim, "latent_dim": latent_dim, "likelihood": likelihood,
            "architecture": architecture, "hidden_dims": hidden_dims,
            "image_shape": data.image_shape}


def mlp(sizes: Sequence[int], activation: str, *, last_activation: bool) -> nn.Sequential:
    """Linear layers between consecutive ``sizes`` with ``activation`` between them (and after
    the last one when ``last_activation``)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if last_activation or i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def network(module: PyroModule, name: str) -> nn.Module:
    """The plain ``nn.Module`` child ``name`` of a PyroModule, read without PyroModule's
    attribute hook. On every access that hook sends one ``pyro.param`` message per tensor of a
    plain child through Pyro's effect handlers, for Pyro's global-store optimizers (which cannot
    train such children in module-local mode anyway); for the default MLPs that is about 8% of
    a training step. Nothing here needs the messages: the engine optimizes
    ``module.parameters()``."""
    return module._modules[name]


class Decoder(nn.Module):
    """eta = f(u) + b: ``u: [..., I] -> eta: [..., D]``, where u is z (I = M) or z with extra
    inputs such as a one-hot label (the CVAE). See the module docstring for the architectures;
    ``hidden_dims`` applies to ``mlp`` only."""

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


class VAE(PyroModule):
    """The VAE of the module docstring: p(z) = N(0, I_M), p(x | z) from ``generation_net``.

    ``forward(x)`` with ``x: [N, D]`` has sample sites ``"z"`` (latent, ``[N, M]``) and ``"x"``
    (observed, event ``[D]``) inside the plate ``"data"`` at dim -1; under an outer plate of K
    particles at dim -2, z is ``[K, N, M]``. ``decode(z)`` gives p(x | z) and ``mean(z)`` its
    mean, for any leading shape of z.

    ``hidden_dims`` None takes the sizes of :func:`default_sizes`. ``context_dim`` extra decoder
    inputs are appended to z (the one-hot label of the CVAE, :mod:`zoo.models.cvae`); 0 for
    the plain VAE.
    """

    offers = frozenset({DECODER})

    def __init__(self, data_dim: int, latent_dim: int, likelihood: str = "bernoulli",
                 architecture: str = "mlp", *, hidden_dims: Sequence[int] | None = None,
                 activation: str | None = None, image_shape: Sequence[int] | None = None,
                 context_dim: int = 0):
        super().__init__()
        check_options(data_dim, latent_dim, likelihood, architecture, image_shape)
        self.data_dim = data_dim
        self.latent_dim = latent_dim
        self.likelihood = likelihood
        self.architecture = architecture
        self.image_shape = None if image_shape is None else tuple(image_shape)
        if hidden_dims is None:
            hidden_dims = default_sizes(data_dim)[1]
        self.generation_net = Decoder(latent_dim + context_dim, data_dim, architecture,
                                      hidden_dims, activation, image_shape)
        if likelihood == "gaussian":
            self.scale = PyroParam(torch.tensor(1.0),
                                   constraint=constraints.greater_than(MIN_SCALE))

    @classmethod
    def for_data(cls, data: Data, **options) -> VAE:
        """The model for ``data`` with the registry's options (``latent_dim``, ``likelihood``,
        ``architecture``), defaults resolved from the data and initialized from it."""
        model = cls(**resolve_options(data, **options))
        model.initialize_from_data(data.x_train)
        return model

    def extra_repr(self) -> str:
        return (f"data_dim={self.data_dim}, latent_dim={self.latent_dim}, "
                f"likelihood={self.likelihood}, architecture={self.architecture}")

    @torch.no_grad()
    def initialize_from_data(self, x: Tensor) -> None:
        """Set the pixel bias b to the logit of the mean training image x_bar (to x_bar itself
        for ``gaussian``, whose scale s starts at the pixels' overall standard deviation), so
        that the decoder starts at the best fit that ignores z. ``x: [N, D]``."""
        x_bar = x.mean(0)
        if self.likelihood == "gaussian":
            self.generation_net.bias.copy_(x_bar)
            self.scale = x.std().clamp(min=2 * MIN_SCALE)
        else:
            self.generation_net.bias.copy_(torch.logit(x_bar.clamp(_PIXEL_EPS, 1 - _PIXEL_EPS)))

    def _check(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.data_dim:
            raise ZooError(f"VAE data must have shape [N, D = {self.data_dim}] to match the "
                           f"model; got shape {list(x.shape)}")
        return x

    def observation(self, eta: Tensor) -> dist.Independent:
        """p(x | eta) of the likelihood: batch shape ``eta.shape[:-1]``, event ``[D]``."""
        if self.likelihood == "bernoulli":
            pixels = dist.Bernoulli(logits=eta, validate_args=False)
        elif self.likelihood == "continuous-bernoulli":
            pixels = dist.ContinuousBernoulli(logits=eta)
        else:
            pixels = dist.Normal(eta, self.scale)
        return pixels.to_event(1)

    def decode(self, z: Tensor) -> dist.Independent:
        """p(x | z): ``z: [..., M]`` gives batch shape ``[...]`` and event shape ``[D]``."""
        return self.observation(network(self, "generation_net")(z))

    def mean(self, z: Tensor) -> Tensor:
        """E[x | z], ``[..., D]``: pixel probabilities (bernoulli), the continuous Bernoulli's
        mean, or eta (gaussian)."""
        return self.decode(z).mean

    def forward(self, x: Tensor) -> None:
        """p(x, z) = prod_n N(z_n | 0, I_M) p(x_n | f(z_n)), ``x: [N, D]``."""
        self._check(x)
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1))
            pyro.sample("x", self.decode(z), obs=x)
