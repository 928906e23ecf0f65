"""PPCA with the default settings on tables the defaults were never tuned for: every guide and
every objective ends within 0.02 nats per point of the closed-form maximum log-likelihood.

The tables differ from ``synthetic-ppca`` (D = 10, M = 2, near-orthogonal loadings of unit
scale) in size, latent dimension, scale and conditioning, and their loadings share a common
direction, so that their columns are far from orthogonal. Training is given the data and the
latent dimension, as a user would, and nothing else.
"""

import numpy as np
import pytest
import torch

from zoo.data import synthetic_ppca
from zoo.evaluate import evaluate
from zoo.experiment import load_run, make_config, train_run

pytestmark = pytest.mark.slow

TABLES = {
    # D, M, column lengths of W, noise sd, weight of the shared direction, overall scale, seed
    "unit-12": (12, 3, [3.0, 1.5, 0.8], 0.4, 1.0, 1.0, 1),
    "tiny-20": (20, 4, [2.0, 1.0, 0.6, 0.3], 0.15, 2.0, 0.01, 4),
}


@pytest.fixture(scope="module", params=list(TABLES))
def table(request, tmp_path_factory):
    """``(path of a CSV table of 2000 rows, its latent dimension)``."""
    D, M, lengths, sigma, shared, scale, seed = TABLES[request.param]
    generator = torch.Generator().manual_seed(seed)
    G = torch.randn(D, M, generator=generator) + shared * torch.randn(D, 1, generator=generator)
    W = G / G.norm(dim=0) * torch.tensor(lengths)
    x, _ = synthetic_ppca(2000, scale * W, torch.zeros(D), scale * sigma, seed=seed)
    path = tmp_path_factory.mktemp("tables") / f"{request.param}.csv"
    np.savetxt(path, x.numpy(), delimiter=",", comments="",
               header=",".join(f"x{d}" for d in range(D)))
    return path, M


@pytest.mark.parametrize("guide, objective", [
    ("meanfield", {}),
    ("full", {}),
    ("meanfield", {"name": "iwae", "num_particles": 8}),
    ("meanfield", {"name": "miwae", "num_particles": 8, "num_groups": 2}),
    ("meanfield", {"name": "dreg", "num_particles": 8}),
])
def test_defaults_reach_the_closed_form_optimum(table, guide, objective, tmp_path):
    path, latent_dim = table
    config = make_config("ppca", guide=guide, options={"latent_dim": latent_dim},
                         data={"file": str(path)}, objective=objective)
    experiment = load_run(train_run(config, tmp_path / "run", quiet=True))
    x = experiment.data.x_train
    with torch.no_grad():
        metrics = evaluate(experiment.model, experiment.guide, x, num_samples=10, train_x=x)
    assert 0 <= metrics["mle_log_likelihood"] - metrics["exact_log_likelihood"] < 0.02
    if guide == "full":
        assert metrics["posterior_kl"] < 0.01
