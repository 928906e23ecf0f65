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

The decoder f (:class:`zoo.networks.Decoder`) is an MLP (``architecture="mlp"``, by default
784-200-200-50 with tanh as in Burda et al. 2015) or, for images whose sides are multiples of 4,
a stack of transposed convolutions (``"conv"``), and ends with a learned bias per pixel,
``b: [D]``. Building the model for a data set (:mod:`zoo.entries.vae`) picks smaller sizes for
small inputs and sets b to the logit of the mean training image (the mean image itself for
``gaussian``), so training starts from the best decoder that ignores z.

The evidence lower bound is

    ELBO(x_n) = E_q(z | x_n)[log p(x_n | z)] - KL(q(z | x_n) || N(0, I)),

with the amortized guide q(z | x) = N(mu(x), diag sigma(x)^2) of :mod:`zoo.guides.vae`.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam
from torch import Tensor
from torch.distributions import constraints

from zoo.contract import DECODER
from zoo.errors import ZooError
from zoo.networks import Decoder, NetworkAttribute

LIKELIHOODS = ("bernoulli", "continuous-bernoulli", "gaussian")
MIN_SCALE = 1e-3
"""Lower bound of the Gaussian likelihood's scale s, so log p(x | z) stays bounded."""


class VAE(PyroModule):
    """The VAE of the module docstring: p(z) = N(0, I_M), p(x | z) from ``generation_net``.

    ``forward(x)`` with ``x: [N, D]`` has sample sites ``"z"`` (latent, ``[N, M]``) and ``"x"``
    (observed, event ``[D]``) inside the plate ``"data"`` at dim -1; under an outer plate of K
    particles at dim -2, z is ``[K, N, M]``. ``decode(z)`` gives p(x | z) and ``mean(z)`` its
    mean, for any leading shape of z.

    ``hidden_dims`` are the decoder's hidden sizes (``mlp`` only), by default those of Burda
    et al. (2015); ``image_shape`` (H, W) is needed by ``conv``. ``context_dim`` extra decoder
    inputs are appended to z (the one-hot label of the CVAE, :mod:`zoo.models.cvae`); 0 for the
    plain VAE.
    """

    offers = frozenset({DECODER})
    generation_net = NetworkAttribute()  # read cheaply: see zoo.networks.NetworkAttribute

    def __init__(self, data_dim: int, latent_dim: int, likelihood: str = "bernoulli",
                 architecture: str = "mlp", *, hidden_dims: Sequence[int] = (200, 200),
                 activation: str | None = None, image_shape: Sequence[int] | None = None,
                 context_dim: int = 0):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ZooError(f"unknown likelihood {likelihood!r}; choose one of: "
                           f"{', '.join(LIKELIHOODS)}")
        self.data_dim = data_dim
        self.latent_dim = latent_dim
        self.likelihood = likelihood
        self.architecture = architecture
        self.image_shape = None if image_shape is None else tuple(image_shape)
        self.generation_net = Decoder(latent_dim + context_dim, data_dim, architecture,
                                      hidden_dims, activation, image_shape)
        if likelihood == "gaussian":
            self.scale = PyroParam(torch.tensor(1.0),
                                   constraint=constraints.greater_than(MIN_SCALE))

    def extra_repr(self) -> str:
        return (f"data_dim={self.data_dim}, latent_dim={self.latent_dim}, "
                f"likelihood={self.likelihood}, architecture={self.architecture}")

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
        return self.observation(self.generation_net(z))

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
