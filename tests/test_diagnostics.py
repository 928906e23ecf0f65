"""Diagnostics against closed forms: exact and best-in-family PPCA guides, k-hat against ArviZ,
SBC's power, NUTS against the exact posterior, the gap decomposition, and ``zoo diagnose``.

Monte-Carlo checks derive their tolerances from standard errors or use fixed seeds."""

import json
import math

import arviz as az
import numpy as np
import pytest
import torch
from scipy import stats

from zoo.cli import main
from zoo.data import load_data
from zoo.diagnostics import (
    DiagnosticSettings,
    amortization_gaps,
    chi_square_uniformity,
    diagnose,
    gaussian_wasserstein,
    importance_diagnostics,
    nuts_posterior,
    pareto_smooth,
    sample_moments,
    simulation_based_calibration,
)
from zoo.errors import ZooError
from zoo.guides.ppca import FullGuide, MeanFieldGuide
from zoo.models.ppca import INITS, PPCA, maximum_likelihood, random_rotation
from zoo.objectives import make_objective
from zoo.train import TrainSettings, fit, seed_everything

f64 = torch.float64
SMALL = DiagnosticSettings(num_chains=2, num_draws=250, nuts_points=2, nuts_chains=2,
                           nuts_warmup=100, nuts_samples=100, sbc_simulations=200,
                           local_steps=200, elbo_particles=500)


@pytest.fixture(autouse=True)
def seed():
    seed_everything(0)


def correlated_model(D=6, M=2, N=40):
    """A float64 PPCA at a random W whose columns are not orthogonal, and data from it."""
    model = PPCA(D, M).double()
    W = torch.randn(D, M, dtype=f64) @ torch.tensor([[1.0, 0.8], [0.0, 0.6]], dtype=f64)
    model.set_parameters(W, torch.randn(D, dtype=f64), 0.5)
    x = torch.randn(N, M, dtype=f64) @ W.T + model.b.detach() + 0.5 * torch.randn(N, D, dtype=f64)
    return model, x


def best_meanfield_kl(model, x):
    """1/2 (sum_i log Lambda_ii - log det Lambda), Lambda the posterior precision."""
    Lambda = model.posterior(x[:1]).precision_matrix[0].detach()
    kl = 0.5 * (Lambda.diagonal().log().sum() - torch.logdet(Lambda)).item()
    assert kl > 0.01                                   # the posterior is correlated
    return kl


# --- PSIS ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("tail", ["normal", "student"])
@pytest.mark.parametrize("scale", [0.2, 1.0, 3.0])
def test_pareto_smoothing_equals_arviz_psislw(tail, scale):
    rng = np.random.default_rng(1)
    draws = rng.standard_normal((4, 1000)) if tail == "normal" else rng.standard_t(3, (4, 1000))
    log_w = scale * draws
    smoothed, khat = az.psislw(log_w)
    for row in range(4):
        ours, k = pareto_smooth(log_w[row])
        np.testing.assert_allclose(ours, smoothed[row], rtol=0, atol=1e-12)
        assert k == pytest.approx(khat[row], abs=1e-12)
    ours = importance_diagnostics(torch.from_numpy(log_w.T))
    np.testing.assert_allclose(ours.khat.numpy(), khat, rtol=0, atol=1e-12)
    assert not ours.exact.any()


def test_equal_weights_are_exact_not_a_failure():
    log_w = torch.full((1000, 3), -7.25, dtype=torch.float32)
    log_w[::2] += 1e-6                                     # round-off of an exact guide
    assert np.isinf(az.psislw(log_w.T.double().numpy())[1]).all()   # ArviZ: no tail, inf
    result = importance_diagnostics(log_w)
    assert result.exact.all()
    assert (result.khat == -math.inf).all()
    torch.testing.assert_close(result.ess, torch.full((3,), 1000.0))


# --- distances and tests ------------------------------------------------------------------------

def test_gaussian_wasserstein_closed_forms():
    m, s = torch.randn(5, 1, dtype=f64), torch.rand(5, 1, 1, dtype=f64) + 0.1
    n, t = torch.randn(5, 1, dtype=f64), torch.rand(5, 1, 1, dtype=f64) + 0.1
    expected = ((m - n).square() + (s.sqrt() - t.sqrt()).square()[..., 0]).sqrt()[:, 0]
    torch.testing.assert_close(gaussian_wasserstein(m, s, n, t), expected)
    A = torch.randn(4, 3, 3, dtype=f64)
    S = A @ A.mT + 0.1 * torch.eye(3, dtype=f64)
    mean = torch.randn(4, 3, dtype=f64)
    torch.testing.assert_close(gaussian_wasserstein(mean, S, mean, S), torch.zeros(4, dtype=f64),
                               atol=1e-6, rtol=0)


def test_chi_square_p_values_equal_scipy():
    counts = torch.tensor([[12, 30], [9, 31], [11, 10], [8, 29]])
    expected = stats.chisquare(counts.numpy(), axis=0).pvalue
    np.testing.assert_allclose(chi_square_uniformity(counts).numpy(), expected, rtol=1e-10)


# --- SBC ----------------------------------------------------------------------------------------

def test_sbc_passes_the_exact_guide_and_rejects_a_miscalibrated_one():
    model, x = correlated_model()
    exact = FullGuide.best_for(model)
    calibration = simulation_based_calibration(model, exact, x, num_simulations=1000)
    assert calibration.ranks.shape == (1000, 2)
    assert calibration.pvalue > 0.01
    narrow = FullGuide.best_for(model)
    narrow.scale_tril = narrow.scale_tril.detach() / 2
    calibration = simulation_based_calibration(model, narrow, x, num_simulations=1000)
    assert calibration.pvalue < 1e-6
    assert calibration.counts[[0, -1]].min() > 2 * calibration.counts[4:6].max()   # U-shaped


# --- NUTS ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_nuts_reproduces_the_exact_ppca_posterior():
    model, x = correlated_model(N=3)
    x = x.float()
    model = model.float()
    z, info = nuts_posterior(model, x, num_chains=2, num_samples=300, warmup_steps=200)
    assert z.shape == (2, 300, 3, 2)
    assert info["divergences"] == 0
    exact = model.posterior(x)
    mean, covariance = sample_moments(z.flatten(0, 1))
    sd = exact.variance.sqrt().detach()
    # autocorrelated draws: allow an effective sample size of 150 out of 600
    assert ((mean - exact.mean.detach()).abs() < 5 * sd / math.sqrt(150)).all()
    torch.testing.assert_close(covariance, exact.covariance_matrix.detach(),
                               atol=6 * sd.max().item() ** 2 / math.sqrt(150), rtol=0)


# --- the gap decomposition ----------------------------------------------------------------------

@pytest.mark.parametrize("Guide", [MeanFieldGuide, FullGuide])
def test_gaps_add_up_and_match_the_closed_forms(Guide):
    model, x = correlated_model()
    guide = Guide.best_for(model)
    with torch.no_grad():                              # move the amortized means off the optimum
        guide.encoder.bias += 0.1
    gaps = amortization_gaps(model, guide, x, settings=SMALL)
    assert gaps.exact
    log_px = model.marginal_log_prob(x).detach()
    torch.testing.assert_close(gaps.log_likelihood, log_px)
    torch.testing.assert_close(gaps.approximation + gaps.amortization, log_px - gaps.elbo,
                               atol=1e-12, rtol=0)
    best = best_meanfield_kl(model, x) if Guide is MeanFieldGuide else 0.0
    torch.testing.assert_close(gaps.approximation, torch.full_like(log_px, best),
                               atol=1e-5, rtol=0)
    assert (gaps.amortization > 0.001).all()


def test_monte_carlo_gaps_add_up_without_closed_forms():
    model, x = correlated_model(N=5)
    guide = MeanFieldGuide.best_for(model)
    settings = DiagnosticSettings(local_steps=200, elbo_particles=20_000)
    gaps = amortization_gaps(model, guide, x, closed_form=False, settings=settings)
    torch.testing.assert_close(gaps.approximation + gaps.amortization,
                               gaps.log_likelihood - gaps.elbo, atol=1e-12, rtol=0)
    assert (gaps.amortization >= 0).all()
    # the log weights of this guide have a standard deviation of about 0.8 nats
    standard_error = 0.8 / math.sqrt(settings.elbo_particles)
    best = best_meanfield_kl(model, x)
    torch.testing.assert_close(gaps.approximation, torch.full((5,), best, dtype=f64),
                               atol=5 * standard_error, rtol=0)


# --- PPCA end to end ----------------------------------------------------------------------------

def test_exact_guide_is_reported_exact():
    model, x = correlated_model(N=8)
    result = diagnose(model, FullGuide.best_for(model), x, settings=SMALL)
    summary = result.summary
    assert summary["posterior_kl"] < 1e-10 and summary["khat_exact"] == 8
    assert "khat_max" not in summary
    assert summary["ess_mean"] == pytest.approx(500)
    assert summary["approximation_gap"] < 1e-8 and summary["amortization_gap"] < 1e-8
    assert set(result.idata.groups()) >= {"posterior", "reference_posterior", "observed_data",
                                          "sample_stats", "metrics"}
    assert result.idata.posterior["z"].dims == ("chain", "draw", "obs", "latent")
    assert result.idata.posterior["W"].shape == (2, 250, 6, 2)


def train_guide(Guide, data, model):
    guide = Guide(data.data_dim, 2)
    guide.initialize_from_data(data.x_train)
    fit(model, guide, make_objective("elbo"), (data.x_train,),
        settings=TrainSettings(steps=800, lr=0.05, batch_size=2000, lr_schedule="cosine",
                               freeze_model=True, quiet=True))
    return guide


@pytest.mark.slow
def test_trained_guides_reach_their_closed_form_optima():
    data = load_data("synthetic-ppca")
    model = PPCA(data.data_dim, 2)
    model.initialize(data.x_train, "closed-form-rotated")
    x = data.x_test[:10]
    full = diagnose(model, train_guide(FullGuide, data, model), x, settings=SMALL).summary
    assert full["posterior_kl"] < 0.01 and full["khat_max"] < 0.5
    best = best_meanfield_kl(model, x)
    meanfield = diagnose(model, train_guide(MeanFieldGuide, data, model), x,
                         settings=SMALL).summary
    assert meanfield["posterior_kl"] == pytest.approx(best, rel=0.02)
    assert meanfield["approximation_gap"] == pytest.approx(best, rel=1e-3)


# --- --init for PPCA ----------------------------------------------------------------------------

def test_ppca_initializations():
    data = load_data("synthetic-ppca")
    x = data.x_train
    model = PPCA(10, 2)
    model.initialize(x, "closed-form")
    W, b, sigma = maximum_likelihood(x, 2)
    torch.testing.assert_close(model.W.detach(), W)
    torch.testing.assert_close(model.sigma.detach(), sigma)
    covariance = model.posterior(x[:1]).covariance_matrix[0].detach()
    assert covariance[0, 1].abs() < 1e-6                   # R = I: a diagonal posterior
    rotated = PPCA(10, 2)
    rotated.initialize(x, "closed-form-rotated")
    torch.testing.assert_close(rotated.marginal_log_prob(x), model.marginal_log_prob(x),
                               atol=0, rtol=1e-5)
    covariance = rotated.posterior(x[:1]).covariance_matrix[0].detach()
    assert covariance[0, 1].abs() / covariance.diagonal().prod().sqrt() > 0.05
    R = random_rotation(4)
    torch.testing.assert_close(R @ R.T, torch.eye(4, dtype=f64))
    with pytest.raises(ZooError, match=f"choose one of: {', '.join(INITS)}"):
        model.initialize(x, "pca")


# --- zoo diagnose -------------------------------------------------------------------------------

def test_zoo_diagnose_writes_netcdf_summary_figures_and_report(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "ppca", "--guide", "full", "--init", "closed-form", "--freeze-model",
                 "--steps", "300", "--lr", "0.05", "--batch-size", "2000", "--quiet",
                 "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["diagnose", str(run), "--points", "4", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert {"posterior_kl", "khat_max", "khat_mean", "ess_mean", "sbc_pvalue",
            "approximation_gap", "amortization_gap"} <= set(summary)
    assert summary["num_points"] == 4
    idata = az.from_netcdf(run / "diagnostics.nc")
    assert idata.reference_posterior.attrs["method"] == "closed form"
    assert idata.sample_stats["log_q"].shape == (4, 500, 4)
    assert (run / "summary.csv").read_text().count("\n") == 5
    for name in ("marginals", "pair", "forest", "khat", "sbc", "gaps"):
        assert (run / "figures" / f"diagnostics-{name}.png").is_file()
    assert "diagnostics" in (run / "report.html").read_text()
    assert main(["diagnose", str(run), "--points", "0"]) == 2
    assert "--points must be at least 1" in capsys.readouterr().err

