"""The exponential-normal teaching model: closed forms against numerical integration, the
truncated normal against its definition (also far in its tail, where Phi(loc / scale)
underflows, in float32 and float64), and the two guides' fits (exact family against
log-normal), with their diagnostics.

Closed forms are compared in float64 to quadrature tolerances; Monte-Carlo checks use five
standard errors."""

import math
from types import SimpleNamespace

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from scipy import special, stats
from torch.distributions import kl_divergence

from zoo.data import Data
from zoo.diagnostics import DiagnosticSettings, diagnose, importance_diagnostics
from zoo.distributions import TruncatedNormal
from zoo.errors import ZooError
from zoo.figures.expnormal import EXPNORMAL_FIT_X, plot_expnormal_fits
from zoo.guides.expnormal import LogNormalGuide, NormalGuide
from zoo.models.expnormal import ExpNormal, marginal_log_prob, posterior
from zoo.objectives import log_weights, make_objective
from zoo.registry import build, get_model
from zoo.settings import TrainSettings
from zoo.train import fit, seed_everything

f64 = torch.float64
X = torch.tensor([[-3.0], [-1.0], [0.5], [2.0], [4.0]], dtype=f64)


@pytest.fixture(autouse=True)
def seed():
    seed_everything(0)


def simulate(num_data, generator=None):
    """x = z + eps, z ~ Exponential(1) by its inverse CDF, eps ~ N(0, 1)."""
    z = -torch.log1p(-torch.rand(num_data, 1, generator=generator))
    return z + torch.randn(num_data, 1, generator=generator)


def exact_guide(model):
    """The exact posterior as a guide."""
    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", model.posterior(x))
    return guide


# --- closed forms -------------------------------------------------------------------------------

def test_marginal_and_posterior_by_numerical_integration():
    z = torch.linspace(0, 25, 500_001, dtype=f64)
    joint = (-z + torch.distributions.Normal(z, 1.0).log_prob(X)).exp()          # [5, grid]
    evidence = torch.trapezoid(joint, z)
    torch.testing.assert_close(marginal_log_prob(X), evidence.log(), atol=1e-8, rtol=0)
    density = joint / evidence[:, None]
    mean = torch.trapezoid(z * density, z)
    variance = torch.trapezoid((z - mean[:, None]) ** 2 * density, z)
    entropy = -torch.trapezoid(density * density.clamp(min=1e-300).log(), z)
    p = posterior(X)
    torch.testing.assert_close(p.mean[:, 0], mean, atol=1e-8, rtol=0)
    torch.testing.assert_close(p.variance[:, 0], variance, atol=1e-8, rtol=0)
    torch.testing.assert_close(p.base_dist.entropy()[:, 0], entropy, atol=1e-7, rtol=0)
    torch.testing.assert_close(p.log_prob(z[::50_000, None, None]).exp(),
                               density[:, ::50_000].T, atol=0, rtol=1e-7)


def test_truncated_normal_sampling_cdf_and_support():
    loc = torch.tensor([-2.0, 0.0, 3.0], dtype=f64, requires_grad=True)
    scale = torch.tensor([0.5, 1.0, 2.0], dtype=f64, requires_grad=True)
    d = TruncatedNormal(loc, scale)
    u = torch.rand(100, 3, dtype=f64)
    torch.testing.assert_close(d.cdf(d.icdf(u)), u, atol=1e-10, rtol=0)
    z = d.rsample((200_000,))
    assert (z >= 0).all()
    standard_error = (d.variance / 200_000).sqrt()
    assert ((z.mean(0) - d.mean).abs() < 5 * standard_error).all()
    z.sum().backward()
    assert loc.grad.abs().min() > 0 and scale.grad.abs().min() > 0
    unchecked = TruncatedNormal(loc, scale, validate_args=False)
    assert unchecked.log_prob(torch.tensor(-0.1, dtype=f64)).eq(-math.inf).all()
    assert d.expand((4, 3)).sample().shape == (4, 3)


# Far in the tail: Phi(a) underflows below a = -13 in float32 and below a = -38 in float64.
TAIL_RATIOS = [-20.0, -50.0]
DTYPES = [torch.float32, f64]


def tail_distribution(a, dtype):
    """Two truncated normals with loc / scale = a, at scales 1 and 0.5."""
    scale = torch.tensor([1.0, 0.5], dtype=dtype)
    return TruncatedNormal(a * scale, scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("a", TAIL_RATIOS)
def test_truncated_normal_far_in_the_tail(a, dtype):
    d = tail_distribution(a, dtype)
    scale = d.scale.double().numpy()
    # the mean s (a + phi(a) / Phi(a)) in float64 with SciPy's erfcx, phi(a) / Phi(a) =
    # 1 / (sqrt(pi / 2) erfcx(-a / sqrt 2)): the sum cancels to about 1 / |a|, which leaves a
    # relative round-off of about eps_64 a^2 in the reference
    lam = 1 / (math.sqrt(math.pi / 2) * special.erfcx(-a / math.sqrt(2)))
    eps = torch.finfo(dtype).eps
    np.testing.assert_allclose(d.mean.double().numpy(), scale * (a + lam),
                               rtol=10 * eps + 10 * torch.finfo(f64).eps * a**2)
    z = d.sample((20_000,))
    assert torch.isfinite(z).all() and (z >= 0).all()
    log_q = d.log_prob(z)
    assert torch.isfinite(log_q).all()
    for column in range(2):
        reference = stats.truncnorm(-a, math.inf, loc=a * scale[column], scale=scale[column])
        assert stats.kstest(z[:, column].double().numpy(), reference.cdf).pvalue > 0.01
    # every draw differs (no collapse onto a few representable values)
    assert z.unique().numel() > 0.99 * z.numel()
    standard_error = (d.variance / z.shape[0]).sqrt()
    assert ((z.mean(0) - d.mean).abs() < 5 * standard_error).all()
    entropy_error = log_q.double().std(0) / math.sqrt(z.shape[0])
    assert ((-log_q.double().mean(0) - d.entropy().double()).abs() < 5 * entropy_error).all()
    u = torch.rand(100, 2, dtype=dtype)
    torch.testing.assert_close(d.cdf(d.icdf(u)), u, atol=100 * eps, rtol=0)


@pytest.mark.parametrize("a", [*TAIL_RATIOS, -4.0, -1.0, 2.0])
def test_truncated_normal_draws_are_differentiable(a):
    """Reparameterized draws at fixed uniforms against finite differences, in and out of the
    far tail."""
    loc = torch.tensor([a, 0.5 * a], dtype=f64, requires_grad=True)
    scale = torch.tensor([1.0, 0.5], dtype=f64, requires_grad=True)
    u = torch.rand(2, dtype=f64)
    assert torch.autograd.gradcheck(lambda m, s: TruncatedNormal(m, s).icdf(u), (loc, scale))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x", [-12.0, -30.0, -60.0])
def test_exact_posterior_draws_far_left_are_finite_and_exact(x, dtype):
    """For x <= -12 the posterior N(x - 1, 1) truncated to z >= 0 lies in the far tail; its draws
    are still finite and every importance weight still equals p(x). log p(x, z) and log p(x)
    are each about -x^2 / 2, so their round-off is about eps x^2."""
    model, points = ExpNormal(), torch.full((3, 1), x, dtype=dtype)
    log_w = log_weights(model, exact_guide(model), points, num_particles=500)
    expected = marginal_log_prob(points).expand(500, 3)
    torch.testing.assert_close(log_w, expected, rtol=0,
                               atol=10 * torch.finfo(dtype).eps * x**2)


@pytest.mark.parametrize("family", ["truncated", "lognormal"])
def test_closed_form_kl_equals_monte_carlo(family):
    p = posterior(X).base_dist
    q = (TruncatedNormal(0.7 * X, 0.8 * torch.ones_like(X)) if family == "truncated"
         else pyro.distributions.LogNormal(0.3 * X, 0.6 * torch.ones_like(X)))
    z = q.sample((400_000,))
    log_ratio = q.log_prob(z) - p.log_prob(z)
    standard_error = log_ratio.std(0) / math.sqrt(z.shape[0])
    assert ((kl_divergence(q, p) - log_ratio.mean(0)).abs() < 5 * standard_error).all()


# --- model, guides, exactness -------------------------------------------------------------------

def test_exact_posterior_as_a_guide_makes_every_weight_the_marginal():
    model = ExpNormal()
    log_w = log_weights(model, exact_guide(model), X, num_particles=200)
    torch.testing.assert_close(log_w, marginal_log_prob(X).expand(200, 5), atol=1e-10, rtol=0)
    result = importance_diagnostics(log_w)
    assert result.exact.all() and (result.khat == -math.inf).all()


@pytest.mark.parametrize("Guide", [NormalGuide, LogNormalGuide])
def test_guides_broadcast_stay_on_the_support_and_get_gradients(Guide):
    model, guide = ExpNormal(), Guide()
    x = simulate(30)
    guide.initialize_from_data(x)
    with pyro.plate("particles", 7, dim=-2):
        z = poutine.trace(guide).get_trace(x).nodes["z"]["value"]
    assert z.shape == (7, 30, 1) and (z >= 0).all()
    assert torch.isfinite(log_weights(model, guide, x, num_particles=7)).all()
    Trace_ELBO().differentiable_loss(model, guide, x).backward()
    for name, parameter in guide.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def fitted(Guide, x):
    """A guide trained on x by the engine, against a model without parameters."""
    guide = Guide()
    guide.initialize_from_data(x)
    fit(ExpNormal(), guide, make_objective("elbo", num_particles=4), (x,),
        settings=TrainSettings(steps=500, lr=0.05, batch_size=1000, lr_schedule="cosine",
                               quiet=True))
    return guide


def test_reverse_kl_fits_the_exact_family_and_loses_mass_with_the_lognormal():
    x = simulate(2000, torch.Generator().manual_seed(1))
    model, points = ExpNormal(), torch.tensor([EXPNORMAL_FIT_X]).T                       # [4, 1]
    settings = DiagnosticSettings(local_steps=300, sbc_simulations=500)
    normal = diagnose(model, fitted(NormalGuide, x), points, settings=settings)
    assert normal.summary["posterior_kl"] < 0.01 and normal.summary["sbc_pvalue"] > 0.01
    # nearly equal weights; their k-hat measures the tail's shape, not its size, so it is noisy
    assert normal.summary["ess_mean"] > 0.99 * normal.summary["num_draws"]
    lognormal = diagnose(model, fitted(LogNormalGuide, x), points, settings=settings)
    # the best log-normal is still far from p: most of the gap is approximation, not amortization
    assert (lognormal.per_point["approximation_gap"] > 0.05).all()
    assert (lognormal.per_point["posterior_kl"] > lognormal.per_point["approximation_gap"]).all()
    # q vanishes at z = 0 where p does not: heavy-tailed weights for x near the boundary
    assert (lognormal.per_point["khat"][1:3] > 0.7).all()
    assert lognormal.summary["sbc_pvalue"] < 1e-6


def test_registry_entry_builds_and_plots(tmp_path):
    entry = get_model("expnormal")
    x = simulate(100)
    data = Data("synthetic-expnormal", x[:90], None, x[90:], None)
    model, guide = build(entry, "normal", data, {})
    assert isinstance(model, ExpNormal) and isinstance(guide, NormalGuide)
    assert not list(model.parameters())
    experiment = SimpleNamespace(model=model, guide=guide, entry=entry,
                                 config={"guide": "normal"})
    with torch.no_grad():
        path = entry.plots["posterior-fit"](experiment, tmp_path / "fit.png")
    assert path.is_file() and plot_expnormal_fits is entry.plots["posterior-fit"]


def test_bad_data():
    with pytest.raises(ZooError, match="exactly 1 column; got D = 3"):
        ExpNormal(3)
    with pytest.raises(ZooError, match=r"shape \[N, 1\]"):
        ExpNormal().marginal_log_prob(torch.zeros(4))
