"""The importance-sampled log-likelihood against the closed form of PPCA, its independence of
the chunking, and the active-unit count."""

import pyro
import pytest
import torch

from zoo.errors import ZooError
from zoo.evaluate import active_units, evaluate, log_likelihood
from zoo.guides.ppca import FullGuide
from zoo.models.ppca import PPCA


@pytest.fixture
def model_guide_x():
    torch.manual_seed(0)
    W = torch.tensor([[2.0, 1.5], [1.0, 1.2], [0.5, -0.3], [1.0, 0.8], [0.0, 0.4]])
    model = PPCA(5, 2)
    model.set_parameters(W, torch.zeros(5), 0.5)
    x = torch.randn(30, 2) @ W.T + 0.5 * torch.randn(30, 5)
    # an inexact proposal that is wider than the posterior in every direction, so that the
    # weights have finite variance and the delta-method error below applies
    guide = FullGuide.best_for(model)
    guide.scale_tril = 1.4 * guide.scale_tril
    with torch.no_grad():
        guide.encoder.bias += 0.2
    return model, guide, x


def test_log_likelihood_agrees_with_the_closed_form_within_its_monte_carlo_error(model_guide_x):
    """With K draws, the estimate log mean w has standard error ~ sd(w) / (sqrt(K) mean(w)) =
    1 / sqrt(ESS_K)-ish; the check uses the delta-method error of each point's own weights."""
    model, guide, x = model_guide_x
    exact = model.marginal_log_prob(x)
    pyro.set_rng_seed(0)
    K = 2000
    estimate = log_likelihood(model, guide, x, num_samples=K)
    assert (estimate.ess < K).all() and (estimate.ess > 1).all()
    standard_error = torch.sqrt((K / estimate.ess - 1) / K)  # sd(w) / (sqrt(K) mean(w))
    assert ((estimate.log_likelihood - exact).abs() < 4 * standard_error + 1e-4).all()
    assert (estimate.elbo < exact).all()
    gap_to_bound = exact - estimate.elbo
    assert gap_to_bound.mean() > 20 * (exact - estimate.log_likelihood).abs().mean()


@pytest.mark.parametrize("max_elements", [30, 200, 10**9])
def test_chunks_combine_exactly(model_guide_x, max_elements):
    """With the exact posterior as proposal every weight is p(x): whatever the chunks (of data
    points and of particles), the estimate is log p(x), the ELBO too, and the ESS is K."""
    model, _, x = model_guide_x
    guide = FullGuide.best_for(model)
    estimate = log_likelihood(model, guide, x, num_samples=64, max_elements=max_elements)
    exact = model.marginal_log_prob(x).detach()
    torch.testing.assert_close(estimate.log_likelihood, exact, atol=1e-4, rtol=0)
    torch.testing.assert_close(estimate.elbo, exact, atol=1e-4, rtol=0)
    torch.testing.assert_close(estimate.ess, torch.full((30,), 64.0), atol=1e-2, rtol=0)


def test_log_likelihood_needs_at_least_one_sample(model_guide_x):
    model, guide, x = model_guide_x
    with pytest.raises(ZooError, match="at least 1 sample"):
        log_likelihood(model, guide, x, num_samples=0)


def test_active_units():
    means = torch.stack([torch.linspace(-1, 1, 50), torch.full((50,), 0.3),
                         0.05 * torch.linspace(-1, 1, 50)], dim=1)
    assert active_units(means) == 1  # variances 0.35, 0 and 0.00087
    with pytest.raises(ZooError, match="at least two"):
        active_units(means[:1])


def test_log_likelihood_shows_its_progress_when_it_lasts(model_guide_x, monkeypatch, capsys):
    """The bar (labelled as asked, on stderr) appears once the work has lasted the delay, here
    set to 0; quiet hides it; the estimate does not depend on it."""
    from zoo import progress

    monkeypatch.setattr(progress, "DELAY", 0.0)
    model, guide, x = model_guide_x
    results = []
    for quiet in (False, True):
        torch.manual_seed(0)
        results.append(log_likelihood(model, guide, x, num_samples=20, max_elements=400,
                                      quiet=quiet, desc="checking").log_likelihood)
        captured = capsys.readouterr()
        assert captured.out == "" and ("checking" in captured.err) != quiet
    torch.testing.assert_close(*results, rtol=0, atol=0)


def test_closed_forms_are_evaluated_in_float64():
    """On a float32 model of a low-noise table far from the origin (noise variance 1e-4 of the
    loadings', data near 100), the Woodbury form of log p(x) cancels all but a 1e-4 share of
    |x - b|^2: evaluated in float32 it is off by about 1e-3 nats per point. evaluate's closed
    forms agree with the dense float64 Gaussian, and the gap of the optimum to itself is 0."""
    torch.manual_seed(0)
    W = torch.randn(15, 2, dtype=torch.float64) * 3.0
    b, sigma = 100.0 + torch.randn(15, dtype=torch.float64), 0.05
    x = torch.randn(3000, 2, dtype=torch.float64) @ W.T + b + sigma * torch.randn(3000, 15,
                                                                                  dtype=torch.float64)
    model = PPCA(15, 2).maximum_likelihood(x.float())
    guide = FullGuide.best_for(model)
    metrics = evaluate(model, guide, x.float(), num_samples=2, train_x=x.float())
    model64, x64 = model.double(), x.float().double()
    C = model64.W @ model64.W.T + model64.sigma**2 * torch.eye(15, dtype=torch.float64)
    dense = torch.distributions.MultivariateNormal(model64.b, C).log_prob(x64).mean().item()
    assert abs(metrics["exact_log_likelihood"] - dense) < 1e-9 * abs(dense)
    assert abs(metrics["mle_log_likelihood"] - metrics["exact_log_likelihood"]) < 1e-6
    assert 0 <= metrics["posterior_kl"] < 1e-6
