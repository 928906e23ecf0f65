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

ROUNDING = 1e-4
"""How far below 0 a gap to the maximum log-likelihood may fall by rounding alone: both
log-likelihoods are means of float32 values of 10 to 100 nats (relative precision about 1e-7,
a few operations each), and SVI now ends at the optimum to that precision."""


@pytest.fixture(scope="module", params=["meanfield", "full"])
def trained(request):
    """PPCA on synthetic-ppca (N = 2000, D = 10, M = 2) with the registry's default settings."""
    experiment = build_experiment(make_config("ppca", guide=request.param), quiet=True)
    fit(experiment.model, experiment.guide, experiment.objective, experiment.train_inputs,
        settings=experiment.settings, before_stop=experiment.entry.before_stop)
    return experiment


def test_svi_reaches_the_closed_form_maximum_likelihood(trained):
    x = trained.data.x_train
    with torch.no_grad():
        metrics = evaluate(trained.model, trained.guide, x, num_samples=10, train_x=x)
    assert -ROUNDING <= metrics["mle_log_likelihood"] - metrics["exact_log_likelihood"] < 0.02


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
    assert -ROUNDING <= metrics["mle_log_likelihood"] - metrics["exact_log_likelihood"] < 0.02


# --- tables nobody tuned for ---------------------------------------------------------------------

UNTUNED_TABLES = {
    # rows, columns, latent size, column lengths of W, noise sd, shared direction, scale, shift
    "wide-small-scale": dict(N=1200, D=40, M=6, lengths=[3, 2, 1.2, 0.8, 0.5, 0.3], sigma=0.15,
                             shared=1.5, scale=0.02, shift=-3.0, seed=11),
    "narrow-large-scale": dict(N=1000, D=16, M=3, lengths=[1.0, 0.6, 0.35], sigma=0.2,
                               shared=2.5, scale=300.0, shift=1000.0, seed=12),
    "low-noise": dict(N=840, D=37, M=3, lengths=[5.8, 5.7, 0.4], sigma=0.068, shared=0.9,
                      scale=10.0, shift=700.0, seed=13),
    "weak-component": dict(N=1500, D=10, M=6, lengths=[9.6, 3.5, 1.4, 1.4, 1.0, 0.27],
                           sigma=0.083, shared=2.45, scale=0.025, shift=20.0, seed=14),
}
"""Tables unlike the default synthetic set (D = 10, M = 2, unit scale): W's columns share a
strong common direction (far from orthogonal), and the data sit at scales and offsets far from
1 and 0. The tests pass nothing but the file and the latent size, as a user would. On
``low-noise`` (noise 1% of the two leading columns, which are nearly equal; few rows) the
loss moves by hundredths of a nat from epoch to epoch while it still falls by about 1e-4 per
epoch: a stopping rule that takes that noise for a plateau stops 0.04-0.1 nats short. On
``weak-component`` the last of six directions has a few times the noise's variance: from a start
small along it, that column grows so slowly while sigma^2 absorbs its variance that the loss
looks flat at the saddle where it is 0, about 0.2 nats short."""


def _untuned_table(name: str, folder) -> tuple[str, int]:
    from zoo.synthetic import synthetic_ppca

    spec = UNTUNED_TABLES[name]
    generator = torch.Generator().manual_seed(spec["seed"])
    common = torch.randn(spec["D"], 1, generator=generator)
    G = torch.randn(spec["D"], spec["M"], generator=generator) + spec["shared"] * common
    W = G / G.norm(dim=0) * torch.tensor(spec["lengths"])
    b = torch.randn(spec["D"], generator=generator)
    x, _ = synthetic_ppca(spec["N"], spec["scale"] * W, spec["scale"] * b + spec["shift"],
                          spec["scale"] * spec["sigma"], seed=spec["seed"])
    path = folder / f"{name}.csv"
    header = ",".join(f"x{d}" for d in range(spec["D"]))
    path.write_text(header + "\n" + "\n".join(",".join(f"{v:.9g}" for v in row)
                                               for row in x.tolist()) + "\n")
    return str(path), spec["M"]


@pytest.mark.parametrize("table", ["wide-small-scale", "narrow-large-scale"])
@pytest.mark.parametrize("guide, loss, options", [
    ("meanfield", "elbo", {}),
    ("full", "elbo", {}),
    ("meanfield", "iwae", {"num_particles": 8}),
    ("meanfield", "miwae", {"num_particles": 8, "num_groups": 2}),
    ("meanfield", "dreg", {"num_particles": 8}),
])
def test_defaults_reach_the_maximum_likelihood_on_untuned_tables(table, guide, loss, options,
                                                                 tmp_path):
    """``zoo train ppca --data FILE --latent-dim M [--guide G] [--loss L --particles P]``:
    the run converges, within 0.02 nats per point of the closed-form maximum log-likelihood of
    the training rows, and the full guide within KL 0.01 of the exact posterior."""
    _assert_defaults_reach_the_optimum(table, guide, loss, options, tmp_path)


@pytest.mark.parametrize("guide", ["meanfield", "full"])
def test_defaults_reach_the_maximum_likelihood_on_a_low_noise_table(guide, tmp_path):
    _assert_defaults_reach_the_optimum("low-noise", guide, "elbo", {}, tmp_path)


def test_the_full_guide_finds_a_weak_component(tmp_path):
    _assert_defaults_reach_the_optimum("weak-component", "full", "elbo", {}, tmp_path)


@pytest.mark.parametrize("seed, guide, bound", [(119, "full", 0.02), (104, "meanfield", 0.005)])
def test_the_false_stop_check_leaves_a_saddle_and_a_mixed_w(seed, guide, bound, tmp_path,
                                                            ppca_benchmark):
    """Two tables of ``benchmarks/ppca_convergence.py`` on which training stopped short and
    reported convergence until the model checked for false stops (:mod:`zoo.entries.ppca_escape`):
    ``random-119``, where the full guide stopped 0.080 nats per point short at a saddle point
    (a direction of 1.7 times the noise variance left to the noise), and ``random-104``, where
    the mean-field guide stopped 0.018 short with two of W's columns still mixed. With the check
    (the default) each run leaves its false stop and ends within ``bound``."""
    path, latent_dim = ppca_benchmark.write_table(f"random-{seed}",
                                                  ppca_benchmark.random_spec(seed), tmp_path)
    history = _assert_defaults_reach_the_optimum(str(path), guide, "elbo", {}, tmp_path,
                                                 latent_dim=latent_dim, bound=bound)
    assert sum(row.get("escaped") == 1 for row in history) >= 1


def _assert_defaults_reach_the_optimum(table, guide, loss, options, tmp_path, latent_dim=None,
                                       bound=0.02):
    """Train on ``table`` (a name of :data:`UNTUNED_TABLES`, or a CSV path with ``latent_dim``)
    with the registry's defaults and nothing else; check it converged within ``bound`` nats per
    point of the maximum likelihood, and the full guide within KL 0.01 of the exact posterior.
    Returns the history."""
    path, latent_dim = ((table, latent_dim) if latent_dim is not None
                        else _untuned_table(table, tmp_path))
    config = make_config("ppca", guide=guide, options={"latent_dim": latent_dim},
                         data={"file": path}, objective={"name": loss, **options})
    experiment = build_experiment(config, quiet=True)
    history = fit(experiment.model, experiment.guide, experiment.objective,
                  experiment.train_inputs, settings=experiment.settings,
                  before_stop=experiment.entry.before_stop)
    x = experiment.data.x_train
    with torch.no_grad():
        metrics = evaluate(experiment.model, experiment.guide, x, num_samples=10, train_x=x)
    assert history[-1]["step"] < experiment.settings.steps   # converged, not out of budget
    assert -ROUNDING <= metrics["mle_log_likelihood"] - metrics["exact_log_likelihood"] < bound
    if guide == "full":
        assert metrics["posterior_kl"] < 0.01
    return history
