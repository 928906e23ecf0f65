"""SVI against the closed form: with its default settings, PPCA trained by SVI reaches the
closed-form maximum likelihood with either guide, the ELBO stays below the exact
log-likelihood, and the full guide recovers the exact posterior."""

import pytest
import torch

from zoo.evaluate import evaluate
from zoo.experiment import build_experiment, make_config
from zoo.objectives import log_weights
from zoo.train import fit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["meanfield", "full"])
def trained(request):
    """PPCA on synthetic-ppca (N = 2000, D = 10, M = 2) with the registry's default settings."""
    experiment = build_experiment(make_config("ppca", guide=request.param), quiet=True)
    fit(experiment.model, experiment.guide, experiment.objective, experiment.train_inputs,
        settings=experiment.settings)
    return experiment


def test_svi_reaches_the_closed_form_maximum_likelihood(trained):
    x = trained.data.x_train
    with torch.no_grad():
        metrics = evaluate(trained.model, trained.guide, x, num_samples=10, train_x=x)
    assert 0 <= metrics["mle_log_likelihood"] - metrics["exact_log_likelihood"] < 0.02


def test_elbo_does_not_exceed_the_exact_log_likelihood(trained):
    x = trained.data.x_train
    torch.manual_seed(0)
    with torch.no_grad():
        log_w = log_weights(trained.model, trained.guide, x, num_particles=200)
        exact = trained.model.marginal_log_prob(x)
    elbo = log_w.mean()
    standard_error = log_w.std() / log_w.numel() ** 0.5
    assert elbo <= exact.mean() + 3 * standard_error


def test_full_guide_recovers_the_exact_posterior(trained):
    if trained.config["guide"] != "full":
        pytest.skip("only the full guide contains the exact posterior")
    x = trained.data.x_train
    with torch.no_grad():
        metrics = evaluate(trained.model, trained.guide, x, num_samples=10)
    assert metrics["posterior_kl"] < 0.01


@pytest.mark.parametrize("loss, options", [
    ("iwae", {"num_particles": 5}),
    ("miwae", {"num_particles": 6, "num_groups": 2}),
    ("ciwae", {"num_particles": 5, "beta": 0.5}),
    ("piwae", {"num_particles": 6, "num_groups": 2}),
    ("dreg", {"num_particles": 5}),
])
def test_every_objective_trains_ppca_to_the_closed_form_optimum(loss, options):
    config = make_config("ppca", guide="meanfield", objective={"name": loss, **options})
    experiment = build_experiment(config, quiet=True)
    fit(experiment.model, experiment.guide, experiment.objective, experiment.train_inputs,
        settings=experiment.settings)
    x = experiment.data.x_train
    with torch.no_grad():
        metrics = evaluate(experiment.model, experiment.guide, x, num_samples=10, train_x=x)
    assert 0 <= metrics["mle_log_likelihood"] - metrics["exact_log_likelihood"] < 0.02
