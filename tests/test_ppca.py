"""Probabilistic PCA: the closed forms against brute force, and the guides against the closed forms.

Closed forms are compared in float64 to round-off tolerances; the one Monte-Carlo test derives its
tolerance from the standard errors of the estimates it checks.
"""

import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from sklearn.decomposition import PCA
from torch.distributions import MultivariateNormal, kl_divergence

from zoo.errors import ZooError
from zoo.guides.ppca import FullGuide, MeanFieldGuide
from zoo.linalg import principal_axes
from zoo.models.ppca import PPCA, marginal_log_prob, maximum_likelihood, posterior

pyro.settings.set(module_local_params=True)

f64 = torch.float64


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def random_parameters(D, M, sigma=0.7):
    W = torch.randn(D, M, dtype=f64)
    b = torch.randn(D, dtype=f64)
    return W, b, torch.tensor(sigma, dtype=f64)


def random_model(D, M, sigma=0.7):
    model = PPCA(D, M).double()
    model.set_parameters(*random_parameters(D, M, sigma))
    return model


def simulate(W, b, sigma, N):
    """x = z W^T + b + sigma eps, straight from the generative process."""
    D, M = W.shape
    z = torch.randn(N, M, dtype=W.dtype)
    return z @ W.T + b + sigma * torch.randn(N, D, dtype=W.dtype)


def log_weights(model, guide, x, num_particles):
    """log p(x, z_kn) - log q(z_kn | x_n), [K, N], from a guide trace replayed in the model."""
    with pyro.plate("particles", num_particles, dim=-2):
        guide_trace = poutine.trace(guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()
    z = guide_trace.nodes["z"]["value"]
    log_joint = model_trace.nodes["z"]["log_prob"] + model_trace.nodes["x"]["log_prob"]
    return log_joint - guide_trace.nodes["z"]["log_prob"], z


# --- closed forms against brute force ---------------------------------------------------------

def test_marginal_log_prob_equals_dense_gaussian():
    D, M = 7, 3
    W, b, sigma = random_parameters(D, M, sigma=0.4)
    x = simulate(W, b, sigma, 20) + torch.randn(20, D, dtype=f64)   # also points off the model
    dense = MultivariateNormal(b, W @ W.T + sigma**2 * torch.eye(D, dtype=f64))
    expected = dense.log_prob(x)
    torch.testing.assert_close(marginal_log_prob(x, W, b, sigma), expected, atol=1e-8, rtol=0)
    # extra leading dimensions batch; float32 in gives float32 out
    torch.testing.assert_close(marginal_log_prob(x.view(4, 5, D), W, b, sigma),
                               expected.view(4, 5), atol=1e-8, rtol=0)
    low = marginal_log_prob(x.float(), W.float(), b.float(), sigma.float())
    assert low.dtype == torch.float32
    torch.testing.assert_close(low.double(), expected, atol=1e-3, rtol=1e-5)


def test_one_dimensional_case_by_numerical_integration():
    W, b, sigma = torch.tensor([[1.3]], dtype=f64), torch.tensor([0.4], dtype=f64), 0.7
    x = torch.tensor([[-2.0], [0.4], [1.1], [3.5]], dtype=f64)
    z = torch.linspace(-15, 15, 300_001, dtype=f64)
    prior = torch.distributions.Normal(0.0, 1.0).log_prob(z)
    likelihood = torch.distributions.Normal(W[0, 0] * z + b, sigma).log_prob(x)   # [4, grid]
    joint = (prior + likelihood).exp()
    evidence = torch.trapezoid(joint, z)
    mean = torch.trapezoid(z * joint, z) / evidence
    variance = torch.trapezoid((z - mean[:, None]) ** 2 * joint, z) / evidence

    torch.testing.assert_close(marginal_log_prob(x, W, b, sigma).exp(), evidence,
                               atol=1e-12, rtol=1e-9)
    exact = posterior(x, W, b, sigma)
    torch.testing.assert_close(exact.mean[:, 0], mean, atol=1e-9, rtol=0)
    torch.testing.assert_close(exact.covariance_matrix[:, 0, 0], variance, atol=1e-9, rtol=0)


def test_posterior_equals_gaussian_conditioning_of_the_joint():
    D, M, N = 6, 3, 10
    W, b, sigma = random_parameters(D, M)
    x = simulate(W, b, sigma, N)
    # [z; x] ~ N([0; b], [[I, W^T], [W, W W^T + sigma^2 I]])
    S_zx, S_xx = W.T, W @ W.T + sigma**2 * torch.eye(D, dtype=f64)
    gain = torch.linalg.solve(S_xx, S_zx.T).T                        # S_zx S_xx^-1, [M, D]
    mean = (x - b) @ gain.T
    covariance = torch.eye(M, dtype=f64) - gain @ S_zx.T

    exact = posterior(x, W, b, sigma)
    assert isinstance(exact, MultivariateNormal)
    assert exact.batch_shape == (N,) and exact.event_shape == (M,)
    torch.testing.assert_close(exact.mean, mean, atol=1e-10, rtol=0)
    torch.testing.assert_close(exact.covariance_matrix, covariance.expand(N, M, M),
                               atol=1e-10, rtol=0)


def test_model_methods_use_the_model_parameters():
    model = random_model(5, 2)
    x = torch.randn(8, 5, dtype=f64)
    W, b, sigma = model.W, model.b, model.sigma
    assert set(model.state_dict()) == {"V", "b", "sigma_unconstrained"}
    torch.testing.assert_close(model.sigma, torch.tensor(0.7, dtype=f64))
    torch.testing.assert_close(model.marginal_log_prob(x), marginal_log_prob(x, W, b, sigma))
    torch.testing.assert_close(model.posterior(x).mean, posterior(x, W, b, sigma).mean)


# --- guides against the posterior ------------------------------------------------------------

def test_exact_guide_makes_every_log_weight_equal_the_log_marginal():
    model = random_model(6, 2)
    x = simulate(model.W.detach(), model.b.detach(), 0.7, 12)
    log_w, z = log_weights(model, FullGuide.best_for(model), x, num_particles=10)
    assert z.std(0).min() > 0.05                       # the draws do differ ...
    torch.testing.assert_close(log_w, model.marginal_log_prob(x).expand(10, 12).detach(),
                               atol=1e-9, rtol=0)     # ... but every weight is p(x)
    # the identity needs the exact posterior: the best mean-field guide's weights vary
    log_w, _ = log_weights(model, MeanFieldGuide.best_for(model), x, num_particles=10)
    assert log_w.std(0).min() > 1e-3


def test_elbo_of_exact_guide_is_the_log_likelihood():
    model = random_model(6, 2)
    x = simulate(model.W.detach(), model.b.detach(), 0.7, 12)
    loss = Trace_ELBO().differentiable_loss(model, FullGuide.best_for(model), x)
    torch.testing.assert_close(loss, -model.marginal_log_prob(x).sum(), atol=1e-8, rtol=0)


def test_exact_guide_and_best_meanfield_guide():
    D, M, N = 6, 3, 8
    model = random_model(D, M)
    x = torch.randn(N, D, dtype=f64)
    exact = model.posterior(x)

    full = FullGuide.best_for(model).distribution(x)
    torch.testing.assert_close(full.mean, exact.mean, atol=1e-10, rtol=0)
    torch.testing.assert_close(full.covariance_matrix, exact.covariance_matrix, atol=1e-10, rtol=0)

    q = MeanFieldGuide.best_for(model).distribution(x)
    loc = q.base_dist.loc.detach().requires_grad_()
    scale = q.base_dist.scale.detach().requires_grad_()

    def kl(loc, scale):
        return kl_divergence(MultivariateNormal(loc, scale_tril=torch.diag_embed(scale)), exact)

    Lambda = exact.precision_matrix[0]                                # M / sigma^2
    gap = 0.5 * (Lambda.diagonal().log().sum() - torch.logdet(Lambda))
    assert gap > 0.01                                     # W's columns are not orthogonal
    best = kl(loc, scale)
    torch.testing.assert_close(best, gap.expand(N), atol=1e-10, rtol=0)
    best.sum().backward()                                             # a stationary point ...
    assert loc.grad.abs().max() < 1e-9 and scale.grad.abs().max() < 1e-9
    with torch.no_grad():                                             # ... and the minimum
        for _ in range(20):
            assert (kl(loc, scale * torch.exp(0.05 * torch.randn(M, dtype=f64))) > best).all()
            assert (kl(loc + 0.05 * torch.randn(N, M, dtype=f64), scale) > best).all()


@pytest.mark.parametrize("Guide", [MeanFieldGuide, FullGuide])
def test_model_and_guide_broadcast_under_a_particle_plate(Guide):
    K, N, D, M = 5, 7, 4, 2
    model, guide = PPCA(D, M), Guide(D, M)
    x = torch.randn(N, D)
    log_w, z = log_weights(model, guide, x, num_particles=K)
    assert z.shape == (K, N, M)
    assert log_w.shape == (K, N)
    assert torch.isfinite(log_w).all()
    assert guide.distribution(x).batch_shape == (N,)
    assert guide.distribution(x).event_shape == (M,)


@pytest.mark.parametrize("Guide", [MeanFieldGuide, FullGuide])
def test_elbo_gradient_reaches_every_parameter(Guide):
    model, guide = PPCA(4, 2), Guide(4, 2)
    x = torch.randn(30, 4)
    Trace_ELBO().differentiable_loss(model, guide, x).backward()
    for module in (model, guide):
        for name, parameter in module.named_parameters():
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


# --- maximum likelihood -----------------------------------------------------------------------

@pytest.fixture
def table():
    W, b, sigma = random_parameters(6, 2, sigma=0.5)
    return simulate(W, b, sigma, 400), (W, b, sigma)


def test_maximum_likelihood_is_a_stationary_point(table):
    x, _ = table
    W, b, sigma = (t.requires_grad_() for t in maximum_likelihood(x, 2))
    marginal_log_prob(x, W, b, sigma).mean().backward()
    for t in (W, b, sigma):
        assert t.grad.abs().max() < 1e-9


def test_maximum_likelihood_matches_sklearn(table):
    x, _ = table
    N, D = x.shape
    W, b, sigma = maximum_likelihood(x, 2)
    C = W @ W.T + sigma**2 * torch.eye(D, dtype=f64)
    sklearn_C = torch.from_numpy(PCA(n_components=2).fit(x.numpy()).get_covariance())
    torch.testing.assert_close(C * N / (N - 1), sklearn_C, atol=1e-10, rtol=1e-10)


def test_maximum_likelihood_beats_truth_and_perturbations(table):
    x, truth = table
    W, b, sigma = maximum_likelihood(x, 2)
    best = marginal_log_prob(x, W, b, sigma).mean()
    assert best > marginal_log_prob(x, *truth).mean()
    for _ in range(20):
        assert best > marginal_log_prob(x, W + 0.01 * torch.randn_like(W), b, sigma).mean()
        assert best > marginal_log_prob(x, W, b + 0.01 * torch.randn_like(b), sigma).mean()
        assert best > marginal_log_prob(x, W, b, sigma * math.exp(0.01 * torch.randn(()))).mean()
    # any rotation of W is equally good
    c, s = math.cos(0.8), math.sin(0.8)
    R = torch.tensor([[c, -s], [s, c]], dtype=f64)
    torch.testing.assert_close(marginal_log_prob(x, W @ R, b, sigma).mean(), best,
                               atol=1e-12, rtol=0)


def test_maximum_likelihood_method_returns_a_new_model(table):
    x, _ = table
    model = PPCA(6, 2)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    optimum = model.maximum_likelihood(x)
    assert isinstance(optimum, PPCA) and optimum is not model
    assert (optimum.data_dim, optimum.latent_dim) == (6, 2)
    assert torch.equal(torch.random.get_rng_state(), rng)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])
    W, b, sigma = maximum_likelihood(x, 2)
    assert optimum.W.dtype == f64
    torch.testing.assert_close(optimum.W.detach(), W)
    torch.testing.assert_close(optimum.b.detach(), b)
    torch.testing.assert_close(optimum.sigma.detach(), sigma)


def _saddle(x, latent_dim):
    """The stationary point of the likelihood that leaves the last of the M leading directions
    to the noise: W's last column is 0 and sigma^2 the mean of the other D - M + 1 eigenvalues
    of S. Returns (W, b, sigma) and S's eigenvalues."""
    r = x - x.mean(0)
    Lambda, U = principal_axes(r.T @ r / x.shape[0])
    sigma2 = Lambda[latent_dim - 1:].mean()
    W = torch.zeros(x.shape[1], latent_dim, dtype=x.dtype)
    W[:, :-1] = U[:, :latent_dim - 1] * (Lambda[:latent_dim - 1] - sigma2).sqrt()
    return (W, x.mean(0), sigma2.sqrt()), Lambda


def test_the_saddle_check_steps_off_a_saddle_point_by_the_gain_it_predicts(table):
    """At the saddle of :func:`_saddle` the gradient is 0; :func:`leave_saddle` replaces the
    zero column by the missing direction at its best length, which raises the log-likelihood by
    exactly 1/2 (t - 1 - log t) per point, t = Lambda_M / sigma^2, and then finds no saddle."""
    from zoo.entries.ppca_escape import MOVE_GAIN, leave_saddle

    x, _ = table
    (W, b, sigma), Lambda = _saddle(x, 2)
    W, b, sigma = (t.requires_grad_() for t in (W, b, sigma))
    marginal_log_prob(x, W, b, sigma).mean().backward()
    assert max(t.grad.abs().max() for t in (W, b, sigma)) < 1e-9
    model = PPCA(6, 2).double()
    model.set_parameters(W.detach(), b.detach(), sigma.detach())
    before = model.marginal_log_prob(x).mean()
    assert leave_saddle(model, x)
    t = Lambda[1] / sigma.detach() ** 2
    gain = model.marginal_log_prob(x).mean() - before
    assert gain > MOVE_GAIN
    torch.testing.assert_close(gain, 0.5 * (t - 1 - t.log()), atol=1e-10, rtol=0)
    W, _, _ = maximum_likelihood(x, 2)
    span = torch.linalg.qr(model.W.detach())[0]
    torch.testing.assert_close((span.T @ W).norm(dim=0), W.norm(dim=0))   # W's span, found
    assert not leave_saddle(model, x)


@pytest.mark.parametrize("rotated", [False, True])
def test_the_saddle_check_leaves_the_maximum_alone(table, rotated):
    from zoo.entries.ppca_escape import leave_saddle

    x, _ = table
    W, b, sigma = maximum_likelihood(x, 2)
    if rotated:
        c, s = math.cos(0.8), math.sin(0.8)
        W = W @ torch.tensor([[c, -s], [s, c]], dtype=f64)
    model = PPCA(6, 2).double()
    model.set_parameters(W, b, sigma)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    assert not leave_saddle(model, x)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def _kl_to_posterior(model, guide, x):
    q = guide.distribution(x)
    if isinstance(guide, MeanFieldGuide):
        q = MultivariateNormal(q.mean, q.variance.diag_embed())
    return kl_divergence(q, model.posterior(x)).mean()


def test_aligning_the_columns_keeps_the_model_and_brings_the_mean_field_guide_closer(table):
    """W R with orthogonal columns and the guide turned by R: W W^T, and the guide's mean
    reconstruction W E_q[z], are unchanged, the mean-field guide's least gap to the posterior
    (:func:`mean_field_gap`) falls from above MOVE_GAIN to 0, and so does its KL from the
    posterior (from the best mean-field guide of the mixed W)."""
    from zoo.entries.ppca_escape import MOVE_GAIN, align_columns, mean_field_gap

    x, _ = table
    model = random_model(6, 2, sigma=0.5)
    guide = MeanFieldGuide.best_for(model)
    W, mean = model.W.detach().clone(), guide.loc(x).detach()
    gap, kl = mean_field_gap(model), _kl_to_posterior(model, guide, x)
    assert gap > MOVE_GAIN
    torch.testing.assert_close(kl, gap)
    storage = [tensor.data_ptr() for tensor in (*model.parameters(), *guide.parameters())]
    assert align_columns(model, guide)
    # in place: the training step holds each parameter's storage
    assert [tensor.data_ptr() for tensor in (*model.parameters(), *guide.parameters())] == storage
    torch.testing.assert_close(model.W @ model.W.T, W @ W.T)
    torch.testing.assert_close(guide.loc(x) @ model.W.T, mean @ W.T)
    assert mean_field_gap(model) < 1e-12
    assert _kl_to_posterior(model, guide, x) < kl / 2
    assert not align_columns(model, guide)


def test_the_moves_leave_the_maximum_with_orthogonal_columns_alone(table):
    from zoo.entries.ppca_escape import before_stop

    x, _ = table
    model = PPCA(6, 2).double()
    model.set_parameters(*maximum_likelihood(x, 2))
    guide = MeanFieldGuide.best_for(model)
    def state():
        return {name: value.clone() for module in (model, guide)
                for name, value in module.state_dict().items()}

    before = state()
    assert not before_stop(model, guide, x)
    for name, value in state().items():
        assert torch.equal(value, before[name]), name


# --- the generative process -------------------------------------------------------------------

def test_samples_from_the_model_have_its_mean_and_covariance():
    D, M, N = 4, 2, 50_000
    model = random_model(D, M, sigma=0.5)
    trace = poutine.trace(poutine.uncondition(model)).get_trace(torch.zeros(N, D, dtype=f64))
    x = trace.nodes["x"]["value"]
    W, b = model.W.detach(), model.b.detach()
    C = W @ W.T + 0.25 * torch.eye(D, dtype=f64)
    # standard errors of the sample mean and of each sample-covariance entry of a Gaussian
    mean_se = (C.diagonal() / N).sqrt()
    cov_se = ((C.diagonal()[:, None] * C.diagonal()[None, :] + C**2) / N).sqrt()
    assert ((x.mean(0) - b).abs() < 5 * mean_se).all()
    assert ((torch.cov(x.T) - C).abs() < 5 * cov_se).all()


def test_initialize_from_data_follows_the_data_scale():
    x = 1000 * torch.randn(300, 10) + 50
    model = PPCA(10, 5)
    model.initialize_from_data(x)
    s = x.var(0, unbiased=False).mean().sqrt()
    torch.testing.assert_close(model.b.detach(), x.mean(0))
    torch.testing.assert_close(model.sigma.detach(), 0.5 * s)
    assert 0.05 * s < model.W.std() < 0.2 * s


# --- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("Module", [PPCA, MeanFieldGuide, FullGuide])
@pytest.mark.parametrize("latent_dim", [0, 10, 12])
def test_latent_dim_out_of_range(Module, latent_dim):
    with pytest.raises(ZooError, match=rf"between 1 and D-1 = 9 .* D = 10 .*got {latent_dim}"):
        Module(10, latent_dim)


def test_bad_data():
    with pytest.raises(ZooError, match="at least 2 columns"):
        PPCA(1, 1)
    with pytest.raises(ZooError, match="between 1 and D-1 = 4"):
        maximum_likelihood(torch.randn(20, 5), 5)
    with pytest.raises(ZooError, match="at least 2 rows"):
        maximum_likelihood(torch.randn(1, 5), 2)
    with pytest.raises(ZooError, match="subspace of dimension <= 2"):
        maximum_likelihood(torch.randn(3, 5), 2)           # 3 centred rows span 2 dimensions
    with pytest.raises(ZooError, match=r"shape \[N, D = 5\]"):
        PPCA(5, 2).marginal_log_prob(torch.randn(4, 6))


# --- lengths: W = V diag(exp(g)), g shared by the model and the full guide ------------------------

def test_W_is_V_with_its_columns_scaled_by_the_lengths():
    model = PPCA(6, 3)
    assert set(model.state_dict()) == {"V", "b", "sigma_unconstrained"}
    torch.testing.assert_close(model.W, model.V)
    g = model.free_lengths()
    with torch.no_grad():
        g.copy_(torch.tensor([0.5, -1.0, 2.0]))
    torch.testing.assert_close(model.W, model.V * g.exp())
    assert set(model.state_dict()) == {"V", "log_length", "b", "sigma_unconstrained"}
    W = torch.randn(6, 3)
    model.set_parameters(W=W)
    torch.testing.assert_close(model.W, W)
    assert set(model.parameter_values()) == {"W", "b", "sigma"}


def test_tying_keeps_q_and_shares_one_parameter():
    from zoo.train import trainable_parameters

    torch.manual_seed(0)
    model, guide, x = PPCA(6, 3), FullGuide(6, 3), torch.randn(20, 6)
    with torch.no_grad():
        model.free_lengths().copy_(torch.tensor([0.5, -1.0, 2.0]))
        guide.encoder.weight.normal_()
    before = guide.distribution(x)
    guide.tie_lengths(model)
    after = guide.distribution(x)
    torch.testing.assert_close(after.loc, before.loc)
    torch.testing.assert_close(after.scale_tril, before.scale_tril)
    assert guide.log_length is model.log_length
    trained = trainable_parameters(model, guide, freeze_model=False)
    assert len({id(p) for p in trained}) == len(trained)
    assert any(p is model.log_length for p in trained)
    assert not any(p is model.log_length
                   for p in trainable_parameters(model, guide, freeze_model=True))


def test_the_shared_length_moves_along_the_valley_of_equal_reconstructions():
    """Moving g changes W's columns by exp(g) and q's z by exp(-g): W z under q, and so the
    expected reconstruction, is unchanged, while q(z) itself (and so the prior's KL) moves."""
    torch.manual_seed(1)
    model, guide, x = PPCA(6, 3), FullGuide(6, 3), torch.randn(20, 6)
    guide.tie_lengths(model)
    with torch.no_grad():
        guide.encoder.weight.normal_()
    W, q = model.W.detach().clone(), guide.distribution(x)
    with torch.no_grad():
        model.log_length.add_(torch.tensor([0.3, -0.2, 0.7]))
    moved = guide.distribution(x)
    torch.testing.assert_close(moved.loc @ model.W.T, q.loc @ W.T)
    torch.testing.assert_close(model.W @ moved.scale_tril, W @ q.scale_tril)
    assert not torch.allclose(moved.loc, q.loc)


@pytest.mark.parametrize("guide, spread", [("meanfield", 0.1), ("full", 1.0)])
def test_runs_from_data_tie_the_full_guide_and_start_it_wider(guide, spread):
    """The registry ties the full guide's lengths to the model's, and starts its W entries at
    about the data's scale s; the mean-field guide's model keeps g fixed at 0 and W ~ s / 10."""
    from zoo.experiment import build_experiment, make_config

    experiment = build_experiment(make_config("ppca", guide=guide), quiet=True)
    model = experiment.model
    tied = guide == "full"
    assert isinstance(model.log_length, torch.nn.Parameter) == tied
    assert (getattr(experiment.guide, "log_length", None) is model.log_length) == tied
    assert 0.5 * spread < model.W.std() / model.data_scale < 2 * spread


@pytest.mark.parametrize("guide", ["meanfield", "full"])
@pytest.mark.parametrize("init", ["closed-form", "closed-form-rotated"])
def test_closed_form_starts_are_exact_with_either_guide(guide, init):
    from zoo.experiment import build_experiment, make_config

    config = make_config("ppca", guide=guide, options={"init": init})
    experiment = build_experiment(config, quiet=True)
    x = experiment.data.x_train
    W, b, sigma = maximum_likelihood(x, experiment.model.latent_dim)
    model = experiment.model
    torch.testing.assert_close(model.W @ model.W.T, W @ W.T)
    torch.testing.assert_close(model.b, b)
    torch.testing.assert_close(model.sigma, sigma)
