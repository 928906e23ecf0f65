"""Objectives against exact identities and against each other on the same draws.

Ground truth is probabilistic PCA, whose log p(x) and posterior are known in closed form: with
the exact posterior as guide every log weight equals log p(x). Stochastic checks compare means
over repeated draws with fixed seeds, within a few standard errors of those same draws.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.nn import PyroModule

from zoo.errors import ZooError
from zoo.guides.ppca import FullGuide, MeanFieldGuide
from zoo.models.ppca import PPCA
from zoo.objectives import (
    CIWAE,
    ELBO,
    IWAE,
    MIWAE,
    PIWAE,
    DReG,
    draw,
    log_weights,
    make_objective,
)

ALL_OBJECTIVES = {
    "elbo": lambda: ELBO(num_particles=6, analytic_kl=False),
    "iwae": lambda: IWAE(num_particles=6),
    "miwae": lambda: MIWAE(num_particles=6, num_groups=2),
    "ciwae": lambda: CIWAE(num_particles=6, beta=0.3),
    "piwae": lambda: PIWAE(num_particles=6, num_groups=3),
    "dreg": lambda: DReG(num_particles=6),
}


@pytest.fixture
def model_and_x():
    torch.manual_seed(0)
    model = PPCA(6, 2)
    x = torch.randn(40, 2) @ torch.randn(2, 6) + 0.3 * torch.randn(40, 6)
    model.initialize_from_data(x)
    return model, x


def _on_same_draws(seed, *computations):
    """Each computation's result, with the random state reset to ``seed`` before each."""
    results = []
    for compute in computations:
        pyro.set_rng_seed(seed)
        results.append(compute())
    return results


def _assert_same_gradients(first, second):
    """Equal up to float32 rounding (the sums run in a different order)."""
    torch.testing.assert_close(first, second, rtol=1e-4, atol=1e-4)


def _annealed(objective, kl_weight):
    """``objective`` with the KL-annealing weight ``kl_weight``, as after that share of one epoch
    of annealing."""
    objective.anneal_epochs = 1.0
    objective.set_progress(kl_weight)
    return objective


def _gradients(loss, module):
    """d loss / d parameters of ``module``, flattened into one vector."""
    grads = torch.autograd.grad(loss, list(module.parameters()), allow_unused=True,
                                retain_graph=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                      for g, p in zip(grads, module.parameters(), strict=True)])


def test_exact_posterior_log_weights_equal_log_marginal(model_and_x):
    model, x = model_and_x
    guide = FullGuide.best_for(model)
    with torch.no_grad():
        log_w = log_weights(model, guide, x, num_particles=7)
        exact = model.marginal_log_prob(x)
    assert log_w.shape == (7, 40)
    torch.testing.assert_close(log_w, exact.expand(7, 40), atol=2e-4, rtol=0)


@pytest.mark.parametrize("name", ALL_OBJECTIVES)
def test_every_objective_is_log_marginal_for_every_draw_of_the_exact_posterior(model_and_x, name):
    model, x = model_and_x
    guide = FullGuide.best_for(model)
    exact = model.marginal_log_prob(x).sum().item()
    for seed in range(3):  # zero variance: every draw gives the same value
        pyro.set_rng_seed(seed)
        loss = ALL_OBJECTIVES[name]().differentiable_loss(model, guide, x)
        assert -loss.item() == pytest.approx(exact, abs=1e-2)


def test_dreg_encoder_gradient_is_zero_for_every_draw_of_the_exact_posterior(model_and_x):
    model, x = model_and_x
    guide = FullGuide.best_for(model)
    for seed in range(3):
        pyro.set_rng_seed(seed)
        loss = DReG(num_particles=5).differentiable_loss(model, guide, x)
        assert _gradients(loss, guide).abs().max() < 1e-3


@pytest.mark.parametrize("name", ["elbo", "iwae", "miwae", "ciwae", "piwae"])
def test_encoder_gradient_of_the_exact_posterior_is_zero_in_expectation(model_and_x, name):
    """Away from DReG (zero for every draw, above) the score term d log q / d phi stays in each
    draw: mean zero, not zero."""
    model, x = model_and_x
    guide = FullGuide.best_for(model)
    pyro.set_rng_seed(0)
    grads = torch.stack([_gradients(ALL_OBJECTIVES[name]().differentiable_loss(model, guide, x),
                                    guide) for _ in range(300)])
    mean, sem = grads.mean(0), grads.std(0) / math.sqrt(len(grads))
    assert sem.max() > 1e-3  # the single draws are noisy ...
    assert ((mean.abs() - 4.5 * sem) < 1e-4).all()  # ... and their mean is zero


def test_iwae_with_one_particle_is_the_elbo_of_the_same_draw(model_and_x):
    model, x = model_and_x
    guide = MeanFieldGuide(6, 2)
    iwae, ours, pyros = _on_same_draws(
        1, lambda: IWAE(num_particles=1).differentiable_loss(model, guide, x),
        lambda: ELBO(analytic_kl=False).differentiable_loss(model, guide, x),
        lambda: Trace_ELBO().differentiable_loss(model, guide, x))
    torch.testing.assert_close(iwae, pyros, atol=1e-3, rtol=1e-6)
    torch.testing.assert_close(ours, pyros, atol=1e-3, rtol=1e-6)


def test_elbo_matches_pyro_with_many_particles_and_with_the_analytic_kl(model_and_x):
    model, x = model_and_x
    guide = MeanFieldGuide(6, 2)
    pyro_options = dict(num_particles=8, vectorize_particles=True, max_plate_nesting=1)
    ours, pyros, ours_analytic, pyros_analytic = _on_same_draws(
        4, lambda: ELBO(num_particles=8, analytic_kl=False).differentiable_loss(model, guide, x),
        lambda: Trace_ELBO(**pyro_options).differentiable_loss(model, guide, x),
        lambda: ELBO(num_particles=8).differentiable_loss(model, guide, x),
        lambda: TraceMeanField_ELBO(**pyro_options).differentiable_loss(model, guide, x))
    torch.testing.assert_close(ours, pyros, atol=1e-3, rtol=1e-6)
    torch.testing.assert_close(ours_analytic, pyros_analytic, atol=1e-3, rtol=1e-6)
    assert abs(ours - ours_analytic) > 1e-2  # different estimators of the same bound


def test_iwae_is_renyi_alpha_zero_on_a_batch(model_and_x):
    """Pyro's RenyiELBO takes its log-mean-exp per element of the plates all model sites share:
    on the 40 points of a data plate without subsampling it is IWAE, draw for draw."""
    model, x = model_and_x
    guide = MeanFieldGuide(6, 2)
    ours, renyi = _on_same_draws(
        2, lambda: IWAE(num_particles=8).loss(model, guide, x),
        lambda: RenyiELBO(alpha=0, num_particles=8, vectorize_particles=True,
                          max_plate_nesting=1).loss(model, guide, x))
    assert ours == pytest.approx(renyi, rel=1e-6)


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


def test_limiting_cases_of_miwae_and_ciwae(model_and_x):
    model, x = model_and_x
    guide = MeanFieldGuide(6, 2)

    def same(first, second):
        a, b = _on_same_draws(5, lambda: first.loss(model, guide, x),
                              lambda: second.loss(model, guide, x))
        assert a == pytest.approx(b, abs=1e-3)

    same(MIWAE(num_particles=12, num_groups=1), IWAE(num_particles=12))
    same(MIWAE(num_particles=12, num_groups=12), ELBO(num_particles=12, analytic_kl=False))
    same(CIWAE(num_particles=12, beta=1.0), ELBO(num_particles=12, analytic_kl=False))
    same(CIWAE(num_particles=12, beta=0.0), IWAE(num_particles=12))
    log_w = _on_same_draws(5, lambda: log_weights(model, guide, x, num_particles=12))[0]
    groups = log_w.reshape(3, 4, 40)
    brute_force = -(torch.logsumexp(groups, 1) - math.log(4)).mean(0).sum()
    assert _on_same_draws(5, lambda: MIWAE(num_particles=12, num_groups=3).loss(
        model, guide, x))[0] == pytest.approx(brute_force.item(), abs=1e-3)


def test_bounds_increase_with_particles_towards_log_marginal(model_and_x):
    """L_1 <= L_5 <= L_50 <= log p(x), compared by the mean over repeated draws, each gap
    larger than four standard errors of the differences; and L_2000 is within 0.01 nats."""
    model, x = model_and_x
    guide = MeanFieldGuide.best_for(model)
    guide.scale = guide.scale * 1.6  # a looser guide: the gaps between the bounds are visible
    exact = model.marginal_log_prob(x).mean().item()
    pyro.set_rng_seed(0)
    repeats = 200
    bounds = torch.tensor([[-IWAE(num_particles=k).loss(model, guide, x) / len(x)
                            for k in (1, 5, 50)] for _ in range(repeats)])
    for lower, upper in ((0, 1), (1, 2)):
        difference = bounds[:, upper] - bounds[:, lower]
        assert difference.mean() > 4 * difference.std() / math.sqrt(repeats)
    top = bounds[:, 2]
    assert top.mean() < exact + 4 * top.std() / math.sqrt(repeats)
    assert exact - top.mean() < exact - bounds[:, 0].mean()
    assert -IWAE(num_particles=2000).loss(model, guide, x) / len(x) == pytest.approx(exact,
                                                                                     abs=0.01)


def test_piwae_sends_the_l_mk_gradient_to_the_model_and_miwae_to_the_guide(model_and_x):
    model, x = model_and_x
    guide = MeanFieldGuide.best_for(model)
    guide.scale = guide.scale * 1.7  # away from the optimum, so the gradients differ
    piwae, iwae, miwae = _on_same_draws(
        6, lambda: PIWAE(num_particles=12, num_groups=3).differentiable_loss(model, guide, x),
        lambda: IWAE(num_particles=12).differentiable_loss(model, guide, x),
        lambda: MIWAE(num_particles=12, num_groups=3).differentiable_loss(model, guide, x))
    torch.testing.assert_close(piwae, iwae)
    _assert_same_gradients(_gradients(piwae, model), _gradients(iwae, model))
    _assert_same_gradients(_gradients(piwae, guide), _gradients(miwae, guide))
    assert (_gradients(iwae, guide) - _gradients(miwae, guide)).abs().max() > 1e-2


@pytest.mark.parametrize("kl_weight", [1.0, 0.3])
def test_dreg_gradients_by_hand(model_and_x, kl_weight):
    """The model gets IWAE's gradient on the same draws; the guide gets
    sum_k [(1 - beta) w~_k + beta w~_k^2] d log w_k / d phi with q's parameters stopped inside
    log q, at the annealing weight beta (w~_k^2 at beta = 1)."""
    model, x = model_and_x
    guide = MeanFieldGuide.best_for(model)
    guide.scale = guide.scale * 1.7
    dreg, iwae, draws = _on_same_draws(
        7, lambda: _annealed(DReG(num_particles=10), kl_weight).differentiable_loss(
            model, guide, x),
        lambda: _annealed(IWAE(num_particles=10), kl_weight).differentiable_loss(
            model, guide, x),
        lambda: draw(model, guide, x, num_particles=10, stop_guide_gradients=True))
    torch.testing.assert_close(dreg, iwae)
    _assert_same_gradients(_gradients(dreg, model), _gradients(iwae, model))
    log_w = draws.log_weights(kl_weight)
    normalized = torch.softmax(log_w, 0).detach()
    weights = (1 - kl_weight) * normalized + kl_weight * normalized.square()
    by_hand = -(weights * log_w).sum()
    _assert_same_gradients(_gradients(dreg, guide), _gradients(by_hand, guide))


@pytest.mark.parametrize("kl_weight", [1.0, 0.3])
def test_dreg_encoder_gradient_is_iwae_in_expectation_with_less_variance(model_and_x,
                                                                         kl_weight):
    """Equal means within 4.5 standard errors of their difference, over repeated draws; at the
    annealing weight 0.3 too, where the weights are (1 - beta) w~_k + beta w~_k^2."""
    model, x = model_and_x
    guide = MeanFieldGuide.best_for(model)
    guide.scale = guide.scale * 1.3
    pyro.set_rng_seed(8)
    repeats = 400
    per_objective = {}
    for objective in (IWAE(num_particles=10), DReG(num_particles=10)):
        objective = _annealed(objective, kl_weight)
        per_objective[type(objective).__name__] = torch.stack([
            _gradients(objective.differentiable_loss(model, guide, x[:8]), guide)
            for _ in range(repeats)])
    iwae, dreg = per_objective["IWAE"], per_objective["DReG"]
    sem = torch.sqrt((iwae.var(0) + dreg.var(0)) / repeats)
    assert ((iwae.mean(0) - dreg.mean(0)).abs() < 4.5 * sem + 1e-4).all()
    assert (dreg.var(0) < iwae.var(0)).float().mean() > 0.9


def test_annealing_weights_the_latent_log_ratio(model_and_x):
    model, x = model_and_x
    guide = MeanFieldGuide(6, 2)
    objective = IWAE(num_particles=4, anneal_epochs=2)
    assert objective.kl_weight == 0.0
    objective.set_progress(0.5)
    assert objective.kl_weight == 0.25
    annealed, draws = _on_same_draws(
        9, lambda: objective.loss(model, guide, x),
        lambda: draw(model, guide, x, num_particles=4))
    by_hand = -(torch.logsumexp(draws.log_likelihood + 0.25 * (draws.log_prior - draws.log_q),
                                0) - math.log(4)).sum()
    assert annealed == pytest.approx(by_hand.item(), abs=1e-3)
    objective.set_progress(7)
    assert objective.kl_weight == 1.0


def test_free_bits_by_hand(model_and_x):
    model, x = model_and_x
    guide = MeanFieldGuide(6, 2)
    loss, draws = _on_same_draws(
        10, lambda: ELBO(free_bits=0.5).loss(model, guide, x),
        lambda: draw(model, guide, x, num_particles=1))
    q = guide.distribution(x).base_dist
    kl_per_dimension = (0.5 * (q.loc ** 2 + q.scale ** 2 - 1 - 2 * q.scale.log())).mean(0)
    expected = -(draws.log_likelihood.sum() - 40 * kl_per_dimension.clamp(min=0.5).sum())
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ZooError, match="factorized Gaussian guide"):
        ELBO(free_bits=0.5).loss(model, FullGuide(6, 2), x)


def test_objectives_work_in_pyro_svi():
    """A conjugate model with pyro.param sites in Pyro's own SVI loop: z_n ~ N(0, 1),
    x_n | z_n ~ N(z_n, 1), so p(z_n | x_n) = N(x_n / 2, 1 / 2)."""

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        a = pyro.param("a", torch.tensor(0.0))
        c = pyro.param("c", torch.tensor(1.0))
        s = pyro.param("s", torch.tensor(1.0), constraint=dist.constraints.positive)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(a * x + c, s))

    x = torch.linspace(-3, 3, 50)
    for objective in (DReG(num_particles=8), PIWAE(num_particles=8, num_groups=2)):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.998}),
                  loss=objective)
        for _ in range(1500):
            svi.step(x)
        assert pyro.param("a").item() == pytest.approx(0.5, abs=0.02)
        assert pyro.param("c").item() == pytest.approx(0.0, abs=0.02)
        assert pyro.param("s").item() == pytest.approx(math.sqrt(0.5), abs=0.02)
    pyro.clear_param_store()


class _Decoder(torch.nn.Module):
    """z_n ~ N(0, I_2), x_n | z_n ~ N(W z_n, I_3), with the data plate of ``size`` data points
    subsampled to the B rows of ``x: [B, 3]`` (the first B): each site carries the scale
    size / B."""

    def __init__(self):
        super().__init__()
        self.W = torch.nn.Parameter(torch.tensor([[1.0, 0.5], [-0.4, 1.2], [0.3, 0.8]]))

    def forward(self, x, *, size):
        with pyro.plate("data", size, subsample=torch.arange(len(x))):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T, 1.0).to_event(1), obs=x)


class _Encoder(torch.nn.Module):
    """q(z_n | x_n) = N(A x_n + c, diag(s^2)) in the same subsampled data plate."""

    def __init__(self):
        super().__init__()
        self.A = torch.nn.Parameter(torch.tensor([[0.4, -0.2, 0.1], [0.2, 0.5, 0.3]]))
        self.c = torch.nn.Parameter(torch.tensor([0.1, -0.1]))
        self.log_s = torch.nn.Parameter(torch.tensor([-0.6, -0.4]))

    def forward(self, x, *, size):
        with pyro.plate("data", size, subsample=torch.arange(len(x))):
            pyro.sample("z", dist.Normal(x @ self.A.T + self.c, self.log_s.exp()).to_event(1))


SUBSAMPLED_OBJECTIVES = {
    **ALL_OBJECTIVES,
    "elbo analytic-kl": lambda: ELBO(num_particles=6),
    "elbo free-bits": lambda: ELBO(num_particles=6, free_bits=0.3),
    "dreg annealed": lambda: _annealed(DReG(num_particles=6), 0.3),
}


def _subsampled_x():
    """B = 8 rows, standing for 8 of N = 40 data points."""
    return torch.randn(8, 3, generator=torch.Generator().manual_seed(0))


def test_draws_of_a_subsampled_plate_are_per_point_and_unscaled():
    """The weights of B = 8 of N = 40 points are those of the same 8 points without
    subsampling, and IWAE is N / B times the sum of their per-point bounds."""
    decoder, encoder, x = _Decoder(), _Encoder(), _subsampled_x()
    draws, unscaled, iwae = _on_same_draws(
        12, lambda: draw(decoder, encoder, x, num_particles=6, size=40),
        lambda: draw(decoder, encoder, x, num_particles=6, size=8),
        lambda: IWAE(num_particles=6).loss(decoder, encoder, x, size=40))
    assert (draws.shape, draws.scale, unscaled.scale) == ((6, 8), 5.0, 1.0)
    torch.testing.assert_close(draws.log_weights(), unscaled.log_weights(), rtol=0, atol=0)
    per_point = torch.logsumexp(draws.log_weights(), 0) - math.log(6)
    assert iwae == pytest.approx(-5 * per_point.sum().item(), rel=1e-6)


def test_a_plate_that_draws_its_own_subsample_of_the_data():
    """``pyro.plate("data", 40, subsample_size=8)`` over all 40 rows: the draws are those of the
    8 rows the guide's plate picked (the model's plate replays them), at the scale 40 / 8."""
    def model(x):
        with pyro.plate("data", len(x), subsample_size=8) as rows:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[rows])

    def guide(x):
        with pyro.plate("data", len(x), subsample_size=8) as rows:
            pyro.sample("z", dist.Normal(0.5 * x[rows], 0.7))

    x = torch.linspace(-2.0, 2.0, 40)
    draws, iwae = _on_same_draws(13, lambda: draw(model, guide, x, num_particles=3),
                                 lambda: IWAE(num_particles=3).loss(model, guide, x))
    assert (draws.shape, draws.scale) == ((3, 8), 5.0)
    rows = draws.guide_trace.nodes["data"]["value"]
    z = draws.guide_trace.nodes["z"]["value"]
    by_hand = (dist.Normal(z, 1.0).log_prob(x[rows]) + dist.Normal(0.0, 1.0).log_prob(z)
               - dist.Normal(0.5 * x[rows], 0.7).log_prob(z))
    torch.testing.assert_close(draws.log_weights(), by_hand)
    per_point = torch.logsumexp(by_hand, 0) - math.log(3)
    assert iwae == pytest.approx(-5 * per_point.sum().item(), rel=1e-6)


@pytest.mark.parametrize("name", SUBSAMPLED_OBJECTIVES)
def test_a_subsampled_data_plate_scales_each_per_point_bound_as_a_whole(name):
    """On the same draws, the loss and every gradient for B = 8 of N = 40 points are exactly
    N / B = 5 times those of the same 8 points without subsampling. The plate's size reaches
    model and guide as a keyword argument."""
    decoder, encoder, x = _Decoder(), _Encoder(), _subsampled_x()
    full, batch = _on_same_draws(
        12, *(lambda size=size: SUBSAMPLED_OBJECTIVES[name]().differentiable_loss(
            decoder, encoder, x, size=size) for size in (40, 8)))
    torch.testing.assert_close(full, 5 * batch, rtol=1e-6, atol=0)
    for module in (decoder, encoder):
        torch.testing.assert_close(_gradients(full, module), 5 * _gradients(batch, module),
                                   rtol=1e-5, atol=1e-6)


def test_sites_with_different_scales_are_refused():
    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            with poutine.scale(scale=2.0):
                pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(0.5 * x, 0.8))

    with pytest.raises(ZooError, match="one scale shared by every sample site"):
        IWAE(num_particles=3).loss(model, guide, torch.zeros(4))


def test_a_latent_site_that_the_guide_does_not_sample_is_refused():
    """Like a mixture's assignment z left to enumeration: replayed, the model would draw it from
    its prior and the weights would silently be those of another quantity."""
    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(torch.tensor([0.3, 0.7])),
                            infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(z.float(), 1.0), obs=x)

    def guide(x):
        pass

    for objective in ALL_OBJECTIVES.values():
        with pytest.raises(ZooError, match=r"latent site 'z'.*--loss enum.*--loss tracegraph"):
            objective().loss(model, guide, torch.zeros(4))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_a_model_without_latent_sites_gives_log_p_x_on_the_data_device(device):
    """No latent site: every weight is p(x), and the empty sums of log p(z), log q(z | x) and of
    the closed-form KL start on the data's device."""
    x = torch.linspace(-2.0, 2.0, 5, device=device)

    def model(x):
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(torch.zeros((), device=device), 1.0), obs=x)

    def guide(x):
        pass

    exact = dist.Normal(0.0, 1.0).log_prob(x.cpu()).sum()
    for objective in (*ALL_OBJECTIVES.values(), lambda: ELBO(num_particles=2)):
        loss = objective().differentiable_loss(model, guide, x)
        assert loss.device == x.device
        torch.testing.assert_close(-loss.cpu(), exact)


def test_discrete_guides_are_refused_with_a_pointer_to_other_objectives():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(0.3))

    with pytest.raises(ZooError, match="tracegraph"):
        IWAE(num_particles=2).differentiable_loss(model, guide, torch.zeros(3))


@pytest.mark.parametrize("name, options, message", [
    ("elbow", {}, "choose one of: elbo, iwae"),
    ("iwae", {"num_particles": 0}, "at least 1"),
    ("miwae", {"num_particles": 10, "num_groups": 3}, "positive divisor"),
    ("piwae", {"num_particles": 10, "num_groups": 0}, "positive divisor"),
    ("ciwae", {"num_particles": 10, "beta": 1.5}, r"\[0, 1\]"),
    ("iwae", {"beta": 0.5}, "--beta does not apply to --loss iwae"),
    ("iwae", {"free_bits": 0.5}, "--free-bits does not apply"),
    ("elbo", {"num_groups": 2}, "--m does not apply"),
    ("elbo", {"free_bits": -1.0}, "at least 0"),
    ("dreg", {"anneal_epochs": -1.0}, "at least 0"),
    ("elbo", {"free_bits": math.nan}, "--free-bits must be a finite number"),
    ("iwae", {"anneal_epochs": math.nan}, "--anneal-epochs must be a finite number"),
    ("ciwae", {"beta": math.nan}, "--beta must be a finite number"),
    ("elbo", {"free_bits": math.inf}, "--free-bits must be a finite number"),
])
def test_invalid_objective_settings_are_refused(name, options, message):
    with pytest.raises(ZooError, match=message):
        make_objective(name, **options)


def test_renyi_puts_the_subsampling_scale_inside_its_log_mean_exp():
    """For B = 8 of N = 40 points, RenyiELBO(alpha=0) is -sum_n log mean_k exp(5 log w_kn), and
    IWAE -5 sum_n log mean_k w_kn, on the same draws; without subsampling they are equal."""
    decoder, encoder, x = _Decoder(), _Encoder(), _subsampled_x()

    def renyi(size):
        return RenyiELBO(alpha=0, num_particles=6, vectorize_particles=True,
                         max_plate_nesting=1).loss(decoder, encoder, x, size=size)

    ours, theirs, draws, ours_whole, theirs_whole = _on_same_draws(
        12, lambda: IWAE(num_particles=6).loss(decoder, encoder, x, size=40),
        lambda: renyi(40), lambda: draw(decoder, encoder, x, num_particles=6, size=40),
        lambda: IWAE(num_particles=6).loss(decoder, encoder, x, size=8), lambda: renyi(8))
    log_w = draws.log_weights()
    assert theirs == pytest.approx(-(torch.logsumexp(5 * log_w, 0) - math.log(6)).sum().item(),
                                   rel=1e-6)
    assert ours == pytest.approx(-5 * (torch.logsumexp(log_w, 0) - math.log(6)).sum().item(),
                                 rel=1e-6)
    assert abs(ours - theirs) > 1.0
    assert ours_whole == pytest.approx(theirs_whole, rel=1e-6)


KEEP = torch.tensor([True, True, False, True, False, True])
"""Two of six data points masked out."""


class _MaskedModel(PyroModule):
    """z_n ~ N(0, I_2), x_n | z_n ~ N(W z_n, I_3), the data points where ``keep`` is False
    masked out of every site."""

    def __init__(self, keep):
        super().__init__()
        self.keep = keep
        self.W = torch.nn.Parameter(torch.tensor([[1.0, 0.5], [-0.4, 1.2], [0.3, 0.8]]))

    def forward(self, x):
        with pyro.plate("data", len(x)), poutine.mask(mask=self.keep):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T, 1.0).to_event(1), obs=x)


class _MaskedGuide(_Encoder):
    """The encoder, with the data points where ``keep`` is False masked out."""

    def __init__(self, keep):
        super().__init__()
        self.keep = keep

    def forward(self, x):
        with poutine.mask(mask=self.keep):
            super().forward(x, size=len(x))


def _masked_x():
    return torch.randn(6, 3, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("num_particles", [1, 4])
def test_masks_count_in_the_closed_form_kl_as_in_pyros_elbos(num_particles):
    """Two of six points masked in model and guide: the ELBO with the closed-form KL is Pyro's
    TraceMeanField_ELBO, and with the Monte-Carlo KL Pyro's Trace_ELBO, value and gradients, on
    the same draws."""
    model, guide, x = _MaskedModel(KEEP), _MaskedGuide(KEEP), _masked_x()
    options = dict(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)
    ours, pyros, ours_mc, pyros_mc = _on_same_draws(
        14, lambda: ELBO(num_particles=num_particles).differentiable_loss(model, guide, x),
        lambda: TraceMeanField_ELBO(**options).differentiable_loss(model, guide, x),
        lambda: ELBO(num_particles=num_particles, analytic_kl=False).differentiable_loss(
            model, guide, x),
        lambda: Trace_ELBO(**options).differentiable_loss(model, guide, x))
    for first, second in ((ours, pyros), (ours_mc, pyros_mc)):
        torch.testing.assert_close(first, second, rtol=1e-6, atol=1e-5)
        for module in (model, guide):
            _assert_same_gradients(_gradients(first, module), _gradients(second, module))


def test_a_mask_that_differs_between_model_and_guide_falls_back_to_the_monte_carlo_kl():
    """m_p log p(z) - m_q log q(z) is no KL: the ELBO takes the Monte-Carlo terms as they are."""
    model, guide, x = _MaskedModel(KEEP), _MaskedGuide(~KEEP), _masked_x()
    analytic, monte_carlo = _on_same_draws(
        15, lambda: ELBO(num_particles=3).loss(model, guide, x),
        lambda: ELBO(num_particles=3, analytic_kl=False).loss(model, guide, x))
    assert analytic == pytest.approx(monte_carlo, rel=1e-6)


def test_free_bits_count_masked_points_as_absent():
    """sum_n m_n [E log p(x_n | z_n) - sum_d max(lambda, mean_{m_n' = 1} KL_n'd)]."""
    model, guide, x = _MaskedModel(KEEP), _MaskedGuide(KEEP), _masked_x()
    loss, draws = _on_same_draws(16, lambda: ELBO(free_bits=0.4).loss(model, guide, x),
                                 lambda: draw(model, guide, x))
    loc, scale = x @ guide.A.T + guide.c, guide.log_s.exp()
    kl = 0.5 * (loc ** 2 + scale ** 2 - 1 - 2 * scale.log())          # [6, 2]
    kl_per_dimension = kl[KEEP].mean(0)
    expected = -(draws.log_likelihood.sum() - 4 * kl_per_dimension.clamp(min=0.4).sum())
    assert loss == pytest.approx(expected.item(), rel=1e-6)
    assert (kl_per_dimension < 0.4).any() and (kl_per_dimension > 0.4).any()


class _Hierarchical(torch.nn.Module):
    """A global mean mu ~ N(0, 1); z_n | mu ~ N(mu 1, I_2), x_n | z_n ~ N(W z_n, I_3), with the
    data plate of ``size`` points subsampled to the B rows of ``x: [B, 3]``."""

    def __init__(self):
        super().__init__()
        self.W = torch.nn.Parameter(torch.tensor([[1.0, 0.5], [-0.4, 1.2], [0.3, 0.8]]))

    def forward(self, x, *, size):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", size, subsample=torch.arange(len(x))):
            z = pyro.sample("z", dist.Normal(mu.unsqueeze(-1) + torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T, 1.0).to_event(1), obs=x)


class _HierarchicalGuide(_Encoder):
    """q(mu) = N(m, s^2) and q(z_n | x_n, mu) = N(A x_n + c + mu / 2, diag(t^2))."""

    def __init__(self):
        super().__init__()
        self.m = torch.nn.Parameter(torch.tensor(0.3))
        self.log_scale = torch.nn.Parameter(torch.tensor(-0.5))

    def forward(self, x, *, size):
        mu = pyro.sample("mu", dist.Normal(self.m, self.log_scale.exp()))
        with pyro.plate("data", size, subsample=torch.arange(len(x))):
            loc = x @ self.A.T + self.c + mu.unsqueeze(-1) / 2
            pyro.sample("z", dist.Normal(loc, self.log_s.exp()).to_event(1))


@pytest.mark.parametrize("size", [8, 40])
@pytest.mark.parametrize("num_particles", [1, 5])
def test_the_elbo_with_a_global_latent_is_pyros(num_particles, size):
    """A global mu and local z_n: the ELBO is Pyro's Trace_ELBO (Monte-Carlo KL) and
    TraceMeanField_ELBO (closed form), value and gradients on the same draws; for B = 8 of
    N = 40 points too, where the local sites carry the scale 5 and mu none."""
    model, guide, x = _Hierarchical(), _HierarchicalGuide(), _subsampled_x()
    options = dict(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)
    results = _on_same_draws(
        17, lambda: ELBO(num_particles=num_particles, analytic_kl=False).differentiable_loss(
            model, guide, x, size=size),
        lambda: Trace_ELBO(**options).differentiable_loss(model, guide, x, size=size),
        lambda: ELBO(num_particles=num_particles).differentiable_loss(model, guide, x,
                                                                      size=size),
        lambda: TraceMeanField_ELBO(**options).differentiable_loss(model, guide, x, size=size))
    for ours, pyros in (results[:2], results[2:]):
        torch.testing.assert_close(ours, pyros, rtol=1e-6, atol=1e-5)
        for module in (model, guide):
            _assert_same_gradients(_gradients(ours, module), _gradients(pyros, module))


def test_iwae_with_a_global_latent_is_renyi_alpha_zero_on_the_joint():
    """The log-mean-exp of the joint log weights of mu and the whole batch: Renyi's quantity,
    draw for draw, and not the sum of per-point bounds."""
    model, guide, x = _Hierarchical(), _HierarchicalGuide(), _subsampled_x()
    ours, renyi, draws = _on_same_draws(
        18, lambda: IWAE(num_particles=5).loss(model, guide, x, size=8),
        lambda: RenyiELBO(alpha=0, num_particles=5, vectorize_particles=True,
                          max_plate_nesting=1).loss(model, guide, x, size=8),
        lambda: draw(model, guide, x, num_particles=5, allow_joint=True, size=8))
    assert ours == pytest.approx(renyi, rel=1e-6)
    assert draws.joint and draws.log_weights().shape == (5, 1)
    assert ours == pytest.approx(-(torch.logsumexp(draws.log_weights(), 0)
                                   - math.log(5)).item(), rel=1e-6)


def test_piwae_and_dreg_route_gradients_with_a_global_latent():
    """As on local latents: the model gets IWAE's gradient; PIWAE's guide that of MIWAE, DReG's
    sum_k w~_k^2 d log w_k / d phi with q's parameters stopped inside log q."""
    model, guide, x = _Hierarchical(), _HierarchicalGuide(), _subsampled_x()
    piwae, iwae, miwae, dreg, draws = _on_same_draws(
        19, *(lambda objective=objective: objective.differentiable_loss(model, guide, x, size=8)
              for objective in (PIWAE(num_particles=6, num_groups=2), IWAE(num_particles=6),
                                MIWAE(num_particles=6, num_groups=2), DReG(num_particles=6))),
        lambda: draw(model, guide, x, num_particles=6, stop_guide_gradients=True,
                     allow_joint=True, size=8))
    for routed in (piwae, dreg):
        torch.testing.assert_close(routed, iwae)
        _assert_same_gradients(_gradients(routed, model), _gradients(iwae, model))
    _assert_same_gradients(_gradients(piwae, guide), _gradients(miwae, guide))
    log_w = draws.log_weights()
    by_hand = -(torch.softmax(log_w, 0).detach().square() * log_w).sum()
    _assert_same_gradients(_gradients(dreg, guide), _gradients(by_hand, guide))
    assert (_gradients(iwae, guide) - _gradients(miwae, guide)).abs().max() > 1e-2


@pytest.mark.parametrize("name", [name for name in ALL_OBJECTIVES if name != "elbo"])
def test_a_subsampled_plate_beside_a_global_latent_is_refused_by_the_bounds(name):
    model, guide, x = _Hierarchical(), _HierarchicalGuide(), _subsampled_x()
    with pytest.raises(ZooError, match=r"site 'mu' is outside the 'data' plate.*--loss elbo"):
        ALL_OBJECTIVES[name]().loss(model, guide, x, size=40)


def test_free_bits_and_per_point_draws_refuse_a_global_latent():
    model, guide, x = _Hierarchical(), _HierarchicalGuide(), _subsampled_x()
    with pytest.raises(ZooError, match="--free-bits counts KL per data point"):
        ELBO(free_bits=0.3).loss(model, guide, x, size=8)
    with pytest.raises(ZooError, match=r"site 'mu' is in plates \[\]"):
        draw(model, guide, x, num_particles=2, size=8)


def test_a_guide_site_missing_from_the_model_gets_pyros_warning():
    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(0.5 * x, 0.8))
            pyro.sample("u", dist.Normal(0.0, 1.0))

    for objective in (ELBO(), IWAE(num_particles=3)):
        with pyro.validation_enabled(True), pytest.warns(
                UserWarning, match="Found non-auxiliary vars in guide but not model"):
            objective.loss(model, guide, torch.zeros(4))


def test_nested_plates_with_several_particles_are_refused_and_with_one_are_pyros():
    """A plate at dim -3 beside the particles' at dim -2: refused with several particles; with
    one particle (no particle plate) the ELBO is Pyro's Trace_ELBO on the same draws."""
    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("rows", 3, dim=-3):
            r = pyro.sample("r", dist.Normal(mu, 1.0))
            with pyro.plate("data", 4):
                pyro.sample("x", dist.Normal(r, 1.0), obs=x.unsqueeze(-2))

    def guide(x):
        mu = pyro.sample("mu", dist.Normal(0.2, 0.7))
        with pyro.plate("rows", 3, dim=-3):
            pyro.sample("r", dist.Normal(mu / 2 + 0.1, 0.8))

    x = torch.linspace(-1.0, 1.0, 12).reshape(3, 4)
    ours, pyros = _on_same_draws(20, lambda: ELBO(analytic_kl=False).loss(model, guide, x),
                                 lambda: Trace_ELBO(max_plate_nesting=3).loss(model, guide, x))
    assert ours == pytest.approx(pyros, rel=1e-6)
    with pytest.raises(ZooError, match="site 'r' is in the plate 'rows' at dim -3"):
        IWAE(num_particles=3).loss(model, guide, x)
