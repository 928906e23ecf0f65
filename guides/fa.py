r"""The amortized guide q(z | x) for factor analysis (:mod:`zoo.models.fa`).

The exact posterior N(G^-1 W^T Psi^-1 (x_n - b), G^-1) is affine in x_n with a covariance that
does not depend on x_n, so the guide

    q(z_n | x_n) = N(A u_n + c, L L^T),    u_n = (x_n - shift) / scale_in,

with ``A: [M, D]``, ``c: [M]`` (``self.encoder``) and a lower-triangular ``L: [M, M]`` with a
positive diagonal (``self.scale_tril``), contains it. The encoder sees the training data's
standardized columns (:mod:`zoo.standardize`) so that one learning rate suits any units.
``forward(x)`` has the model's signature and samples ``"z"``, ``[N, M]``, in the plate
``"data"``.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam
from torch import Tensor, nn
from torch.distributions import constraints

from zoo import standardize
from zoo.contract import DISTRIBUTION


class FullGuide(PyroModule):
    """q(z_n | x_n) = N(A u_n + c, L L^T): a linear encoder and one full covariance."""

    offers = frozenset({DISTRIBUTION})

    def __init__(self, data_dim: int, latent_dim: int):
        super().__init__()
        self.encoder = PyroModule[nn.Linear](data_dim, latent_dim)
        self.scale_tril = PyroParam(torch.eye(latent_dim), constraint=constraints.lower_cholesky)
        standardize.add_buffers(self, data_dim)

    def initialize_from_data(self, x: Tensor) -> None:
        """Standardize the encoder's input with the columns of ``x: [N, D]``."""
        standardize.fit(self, x)

    def distribution(self, x: Tensor) -> dist.MultivariateNormal:
        """q(z | x): batch [N], event [M]."""
        loc = self.encoder(standardize.standardized(self, x))
        return dist.MultivariateNormal(loc, scale_tril=self.scale_tril)

    def forward(self, x: Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", self.distribution(x))
