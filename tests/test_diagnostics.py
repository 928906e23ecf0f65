"""Diagnostics against closed forms: exact and best-in-family PPCA guides, k-hat against ArviZ,
SBC's power, NUTS against the exact posterior, the gaps against an independent ELBO and the
closed forms, and ``zoo diagnose`` on every kind of model.

Monte-Carlo checks derive their tolerances from standard errors or use fixed seeds."""

import dataclasses
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
    diagnose_run,
    draw_figures,
    gaussian_wasserstein,
    guide_draws,
    importance_diagnostics,
    nuts_posterior,
    pareto_smooth,
    simulation_based_calibration,
    summarize,
)
from zoo.entries.ppca import INITS, initialize, random_rotation
from zoo.errors import ZooError
from zoo.evaluate import log_likelihood
from zoo.guides.ppca import FullGuide, MeanFieldGuide
from zoo.models.ppca import PPCA, maximum_likelihood
from zoo.objectives import log_weights, make_objective
from zoo.registry import build, get_model
from zoo.report import format_value
from zoo.settings import TrainSettings
from zoo.train import fit, seed_everything

f64 = torch.float64
SMALL = DiagnosticSettings(num_chains=2, num_draws=250, nuts_points=2, nuts_chains=2,
                           nuts_warmup=100, nuts_samples=100, sbc_simulations=200,
                           local_steps=200, elbo_particles=500)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def seed():
    seed_everything(0)


def strict_json(text):
    """json.loads that refuses NaN, Infinity and -Infinity, which are not JSON."""
    def refuse(constant):
        raise ValueError(f"{constant} is not valid JSON")
    return json.loads(text, parse_constant=refuse)


def assert_png(path):
    content = path.read_bytes()
    assert content.startswith(PNG_SIGNATURE) and len(content) > 2000, path


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


def test_points_without_a_fitted_tail_are_counted_apart_and_the_summary_is_json():
    log_w = torch.randn(1000, 3, dtype=f64)
    log_w[:, 0] = -3.0                                     # exact
    log_w[:, 1] = 0.0
    log_w[:4, 1] = 5.0                                     # four weights dwarf the rest
    importance = importance_diagnostics(log_w)
    assert importance.exact.tolist() == [True, False, False]
    assert np.isinf(az.psislw(log_w[:, 1].numpy())[1])     # ArviZ: no tail to fit either
    assert importance.khat[1] == math.inf and math.isfinite(importance.khat[2])
    per_point = {"posterior_kl": torch.tensor([0.0, math.inf, 0.1], dtype=f64),
                 "khat": importance.khat, "ess": importance.ess}
    summary = summarize(per_point, importance, None, num_draws=1000)
    assert strict_json(json.dumps(summary)) == summary
    assert summary["khat_exact"] == 1 and summary["khat_unfitted"] == 1
    assert summary["khat_max"] == summary["khat_mean"] == importance.khat[2].item()
    assert summary["posterior_kl"] is None                 # the mean of an infinite KL


def test_a_single_particle_in_the_last_chunk_of_guide_draws():
    model, x = correlated_model(N=5)
    guide = FullGuide.best_for(model)
    draws = guide_draws(model, guide, x, num_draws=251, chunk=250)
    assert draws.z.shape == (251, 5, 2) and draws.log_q.shape == (251, 5)
    torch.testing.assert_close(draws.log_weights,                # exact guide: all equal p(x)
                               model.marginal_log_prob(x).detach().expand(251, 5))
    assert guide_draws(model, guide, x, num_draws=1).z.shape == (1, 5, 2)
    settings = dataclasses.replace(SMALL, num_chains=1, num_draws=251)
    result = diagnose(model, guide, x, settings=settings)
    assert result.idata.posterior["z"].shape == (1, 251, 5, 2)
    assert result.summary["num_draws"] == 251 and result.summary["khat_exact"] == 5


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
    """The first and second moments about the exact mean, E[z - mu] = 0 and
    E[(z - mu)(z - mu)^T] = Sigma, within five Monte-Carlo standard errors that ArviZ measures
    from the chains (their autocorrelation included)."""
    model, x = correlated_model(N=3)
    x = x.float()
    model = model.float()
    z, info = nuts_posterior(model, x, num_chains=2, num_samples=300, warmup_steps=200)
    assert z.shape == (2, 300, 3, 2)
    assert info["divergences"] == 0
    exact = model.posterior(x)
    centred = (z - exact.mean.detach()).double()                               # [C, S, N, M]
    moments = az.convert_to_dataset({
        "first": centred.numpy(),
        "second": torch.einsum("csnm,csnk->csnmk", centred, centred).numpy()})
    assert min(az.ess(moments).min().to_array().values) > 100   # enough for a reliable MCSE
    mcse = az.mcse(moments)
    error = {"first": centred.mean((0, 1)),
             "second": torch.einsum("csnm,csnk->nmk", centred, centred) / (2 * 300)
             - exact.covariance_matrix.detach().double()}
    for name, value in error.items():
        assert (value.abs() < 5 * torch.from_numpy(mcse[name].values)).all(), name


# --- the gap decomposition ----------------------------------------------------------------------

def elbo_and_standard_error(model, guide, x, num_samples):
    """An independent Monte-Carlo ELBO per point (``zoo.evaluate.log_likelihood``) and its
    standard error, the standard deviation of the log weights (from fresh draws) / sqrt(K)."""
    with torch.no_grad():
        sd = log_weights(model, guide, x, num_particles=num_samples).std(0)
    elbo = log_likelihood(model, guide, x, num_samples=num_samples).elbo
    return elbo, sd / math.sqrt(num_samples)


@pytest.mark.parametrize("Guide", [MeanFieldGuide, FullGuide])
def test_gaps_match_an_independent_elbo_and_the_closed_forms(Guide):
    """log p(x) exact, ELBO(q) against a Monte-Carlo ELBO that shares nothing with the gaps'
    closed-form KL, and the approximation gap against the closed-form best KL of the family:
    then the amortization gap, the rest of log p(x) - ELBO(q), is right too."""
    model, x = correlated_model()
    guide = Guide.best_for(model)
    with torch.no_grad():                              # move the amortized means off the optimum
        guide.encoder.bias += 0.1
    gaps = amortization_gaps(model, guide, x, settings=SMALL)
    assert gaps.exact
    log_px = model.marginal_log_prob(x).detach()
    torch.testing.assert_close(gaps.log_likelihood, log_px)
    elbo, standard_error = elbo_and_standard_error(model, guide, x, 20_000)
    assert ((gaps.elbo - elbo).abs() < 5 * standard_error).all()
    best = best_meanfield_kl(model, x) if Guide is MeanFieldGuide else 0.0
    torch.testing.assert_close(gaps.approximation, torch.full_like(log_px, best),
                               atol=1e-5, rtol=0)
    assert (gaps.amortization > 0.001).all()


def test_monte_carlo_gaps_without_closed_forms():
    """The same checks when the gaps use Monte-Carlo ELBOs: the estimates of ELBO(q) (the gaps'
    and the independent one) each carry a standard error, and q* (fitted from q, the best
    mean-field guide, so hardly moved) has log weights as spread as q's."""
    model, x = correlated_model(N=5)
    guide = MeanFieldGuide.best_for(model)
    K = 20_000
    settings = DiagnosticSettings(local_steps=200, elbo_particles=K)
    gaps = amortization_gaps(model, guide, x, closed_form=False, settings=settings)
    torch.testing.assert_close(gaps.log_likelihood, model.marginal_log_prob(x).detach().double())
    elbo, standard_error = elbo_and_standard_error(model, guide, x, K)
    assert ((gaps.elbo - elbo).abs() < 5 * math.sqrt(2) * standard_error).all()
    assert (gaps.amortization >= 0).all()
    best = best_meanfield_kl(model, x)
    assert ((gaps.approximation - best).abs() < 5 * standard_error.double()).all()


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
    initialize(model, data.x_train, "closed-form-rotated")
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
    initialize(model, x, "closed-form")
    W, b, sigma = maximum_likelihood(x, 2)
    torch.testing.assert_close(model.W.detach(), W)
    torch.testing.assert_close(model.sigma.detach(), sigma)
    covariance = model.posterior(x[:1]).covariance_matrix[0].detach()
    assert covariance[0, 1].abs() < 1e-6                   # R = I: a diagonal posterior
    rotated = PPCA(10, 2)
    initialize(rotated, x, "closed-form-rotated")
    torch.testing.assert_close(rotated.marginal_log_prob(x), model.marginal_log_prob(x),
                               atol=0, rtol=1e-5)
    covariance = rotated.posterior(x[:1]).covariance_matrix[0].detach()
    assert covariance[0, 1].abs() / covariance.diagonal().prod().sqrt() > 0.05
    R = random_rotation(4)
    torch.testing.assert_close(R @ R.T, torch.eye(4, dtype=f64))
    with pytest.raises(ZooError, match=f"choose one of: {', '.join(INITS)}"):
        initialize(model, x, "pca")


# --- zoo diagnose -------------------------------------------------------------------------------

def test_zoo_diagnose_writes_netcdf_summary_figures_and_report(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "ppca", "--guide", "full", "--init", "closed-form", "--freeze-model",
                 "--steps", "300", "--lr", "0.05", "--batch-size", "2000", "--quiet",
                 "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["diagnose", str(run), "--points", "4", "--json"]) == 0
    summary = strict_json(capsys.readouterr().out)
    assert {"posterior_kl", "khat_max", "khat_mean", "ess_mean", "sbc_pvalue",
            "approximation_gap", "amortization_gap"} <= set(summary)
    assert summary["num_points"] == 4
    idata = az.from_netcdf(run / "diagnostics.nc")
    assert idata.reference_posterior.attrs["method"] == "closed form"
    assert idata.sample_stats["log_q"].shape == (4, 500, 4)
    assert (run / "summary.csv").read_text().count("\n") == 5
    report = (run / "report.html").read_text()
    for name in ("marginals", "pair", "forest", "khat", "sbc", "gaps"):
        assert_png(run / "figures" / f"diagnostics-{name}.png")
        assert f'src="figures/diagnostics-{name}.png"' in report
    assert "<h2>diagnostics: ppca with the full guide</h2>" in report
    assert "q(z|x) against the closed form posterior on 4 test points" in report
    assert "<th>mean over 4 test points</th>" in report
    for name in ("posterior_kl", "khat_max", "sbc_pvalue", "amortization_gap", "num_points"):
        assert f"<td>{name}</td><td>{format_value(name, summary[name])}</td>" in report
    assert (f"<td>ess_mean</td><td>{summary['ess_mean']:.1f} of {summary['num_draws']}</td>"
            in report)
    assert "PSIS k-hat &lt; 0.5" in report and "SBC: the p-value" in report
    assert main(["diagnose", str(run), "--points", "0"]) == 2
    assert "--points must be at least 1" in capsys.readouterr().err



# --- zoo diagnose on every kind of model ---------------------------------------------------------

TINY = DiagnosticSettings(num_chains=2, num_draws=50, nuts_points=1, nuts_chains=1,
                          nuts_warmup=50, nuts_samples=50, sbc_simulations=50, sbc_draws=9,
                          local_steps=10, local_particles=4, elbo_particles=50)
KEYS = {"vae": {"posterior_kl", "ess_mean", "khat_exact", "khat_unfitted", "sbc_pvalue",
                "approximation_gap", "amortization_gap", "mean_error"},
        "gmm": {"posterior_kl", "log_likelihood", "elbo", "approximation_gap",
                "amortization_gap"}}
KEYS["cvae"] = KEYS["vae"]


@pytest.mark.parametrize("name, options", [
    ("vae", ["--latent-dim", "2", "--steps", "5", "--batch-size", "100"]),
    ("cvae", ["--latent-dim", "2", "--steps", "5", "--batch-size", "100"]),
    ("gmm", ["--guide", "amortized", "--restarts", "1", "--steps", "30"]),
])
def test_diagnose_runs_of_every_kind_of_model(tmp_path, name, options):
    """VAE and CVAE (NUTS reference, importance-sampled gaps) and the GMM (responsibilities),
    each briefly trained and diagnosed with tiny settings."""
    run = tmp_path / name
    assert main(["train", name, *options, "--quiet", "--out", str(run)]) == 0
    summary = diagnose_run(run, num_points=2, settings=TINY)
    assert strict_json(json.dumps(summary)) == summary
    assert summary["num_points"] == 2 and KEYS[name] <= set(summary)
    idata = az.from_netcdf(run / "diagnostics.nc")
    method = "closed form" if name == "gmm" else "NUTS"
    assert idata.reference_posterior.attrs["method"] == method
    assert (run / "summary.csv").read_text().count("\n") == 3
    assert_png(run / "figures" / "diagnostics-marginals.png")
    assert f"<h2>diagnostics: {name} with the" in (run / "report.html").read_text()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["ppca", "cvae", "gmm"])
def test_diagnose_and_its_figures_on_the_gpu(tmp_path, name):
    """Closed-form (PPCA), NUTS (CVAE) and mixture (GMM) references, with the model, the guide
    and the data on the GPU."""
    if name == "ppca":
        model, x = correlated_model(N=4)
        guide = MeanFieldGuide.best_for(model)
        inputs = (x,)
    else:
        data = load_data("digits" if name == "cvae" else "synthetic-gmm")
        model, guide = build(get_model(name), "amortized" if name == "gmm" else None, data, {})
        inputs = (data.x_train[:3], data.y_train[:3]) if name == "cvae" else (data.x_train[:3],)
    model, guide = model.cuda(), guide.cuda()
    result = diagnose(model, guide, *(tensor.cuda() for tensor in inputs), settings=TINY)
    assert strict_json(json.dumps(result.summary)) == result.summary
    for path in draw_figures(result, tmp_path):
        assert_png(path)
