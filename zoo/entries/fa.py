"""The registry entry of factor analysis (:mod:`zoo.models.fa`), the worked example of the
README's "Adding a model": how to build model and guide from data, and the settings."""

from __future__ import annotations

import torch

from zoo.data import Data
from zoo.entry import TO_CONVERGENCE, ModelEntry, from_data
from zoo.errors import ZooError
from zoo.guides import fa as guides
from zoo.models.fa import FactorAnalysis


def check_latent_dim(data: Data, latent_dim: int) -> None:
    """Refuse a latent size outside 1 <= M < D, naming the flag."""
    if not 0 < latent_dim < data.data_dim:
        raise ZooError(f"--latent-dim must be between 1 and D-1 = {data.data_dim - 1} for data "
                       f"with D = {data.data_dim} columns; got {latent_dim}")


@torch.no_grad()
def build_model(data: Data, *, latent_dim: int) -> FactorAnalysis:
    """FA(D, latent_dim) started at the data: b = the column means, psi = half of each column's
    variance, and a small random W (s / 10 entrywise, s the root mean column variance, from
    torch's global generator) to break the rotation symmetry."""
    check_latent_dim(data, latent_dim)
    x = data.x_train
    model = FactorAnalysis(data.data_dim, latent_dim)
    variance = x.var(0).clamp(min=1e-6)
    model.W.copy_(0.1 * variance.mean().sqrt() * torch.randn(model.W.shape))
    model.b.copy_(x.mean(0))
    model.psi = 0.5 * variance
    return model


def build_guide(data: Data, *, latent_dim: int) -> guides.FullGuide:
    check_latent_dim(data, latent_dim)
    return from_data(guides.FullGuide, data, latent_dim=latent_dim)


ENTRY = ModelEntry(
    name="fa",
    description="factor analysis, x = W z + b + eps with eps ~ N(0, diag(psi)): closed-form "
                "marginal and posterior",
    build_model=build_model,
    guides={"full": build_guide},
    default_data="synthetic-ppca",
    options={"latent_dim": 2},
    train=TO_CONVERGENCE,
    demo={"steps": 1500},
)
