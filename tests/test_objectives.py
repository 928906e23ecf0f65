"""Objectives against exact identities: the log weights of the exact posterior are log p(x),
IWAE with one particle is the ELBO of the same draw, and IWAE agrees with Pyro's RenyiELBO
(alpha = 0) on a single data point and with a brute-force per-point computation on a batch."""

import math

import pyro
import pytest
import torch
from pyro.infer import RenyiELBO, Trace_ELBO

from zoo.errors import ZooError
from zoo.guides.ppca import FullGuide, MeanFieldGuide
from zoo.models.ppca import PPCA
from zoo.objectives import IWAE, log_weights, make_objective


@pytest.fixture
def model_and_x():
    torch.manual_seed(0)
    model = PPCA(6, 2)
    x = torch.randn(40, 2) @ torch.randn(2, 6) + 0.3 * torch.randn(40, 6)
    model.initialize_from_data(x)
    return model, x


def test_exact_posterior_log_weights_equal_log_marginal(model_and_x):
    model, x = model_and_x
    guide = FullGuide.best_for(model)
    with torch.no_grad():
        log_w = log_weights(model, guide, x, num_particles=7)
        exact = model.marginal_log_prob(x)
    assert log_w.shape == (7, 40)
    torch.testing.assert_close(log_w, exact.expand(7, 40), atol=2e-4, rtol=0)
    for name in ("iwae", "elbo"):
        loss = make_objective(name, num_particles=5).differentiable_loss(model, guide, x)
        torch.testing.assert_close(-loss, exact.sum(), atol=1e-2, rtol=1e-5)


def _on_same_draws(seed, *computations):
    """Each computation's result, with the random state reset to ``seed`` before each."""
    results = []
    for compute in computations:
        pyro.set_rng_seed(seed)
        results.append(compute())
    return results


def test_iwae_with_one_particle_is_the_elbo_of_the_same_draw(model_and_x):
    model, x = model_and_x
    guide = MeanFieldGuide(6, 2)
    iwae, elbo = _on_same_draws(
        1, lambda: IWAE(num_particles=1).differentiable_loss(model, guide, x),
        lambda: Trace_ELBO().differentiable_loss(model, guide, x))
    torch.testing.assert_close(iwae, elbo, atol=1e-3, rtol=1e-6)


def test_iwae_agrees_with_renyi_alpha_zero_on_a_single_data_point(model_and_x):
    model, x = model_and_x
    guide = MeanFieldGuide(6, 2)
    one = x[:1]
    ours, renyi = _on_same_draws(
        2, lambda: IWAE(num_particles=50).loss(model, guide, one),
        lambda: RenyiELBO(alpha=0, num_particles=50, vectorize_particles=True,
                          max_plate_nesting=1).loss(model, guide, one))
    assert ours == pytest.approx(renyi, abs=1e-3)


def test_iwae_is_per_data_point_on_a_batch(model_and_x):
    model, x = model_and_x
    guide = MeanFieldGuide(6, 2)
    ours, log_w = _on_same_draws(
        3, lambda: IWAE(num_particles=20).differentiable_loss(model, guide, x),
        lambda: log_weights(model, guide, x, num_particles=20))
    brute_force = -sum(torch.logsumexp(log_w[:, n], 0) - math.log(20) for n in range(40))
    torch.testing.assert_close(ours, brute_force, atol=1e-3, rtol=1e-6)
    # the batch-mixed estimate (log-mean-exp of the summed weights) is a different number
    mixed = -(torch.logsumexp(log_w.sum(1), 0) - math.log(20))
    assert abs(mixed - ours) > 1.0


def test_unknown_objective_and_bad_particles():
    with pytest.raises(ZooError, match="choose one of: elbo, iwae"):
        make_objective("elbow")
    with pytest.raises(ZooError, match="at least 1"):
        make_objective("iwae", num_particles=0)
