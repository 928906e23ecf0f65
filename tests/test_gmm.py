"""The Gaussian mixture: closed forms against scikit-learn and brute force, the enumerated loss
against the log joint, the amortized guide against the exact posterior, fits with the default
settings against EM and the truth, and bad input.

Identities are checked in float64 to round-off tolerances. Fits are compared with EM to the
0.01 nats per data point the issue asks for (measured gaps: below 3e-4), and with the truth to
4 standard errors of each estimate; the one Monte-Carlo test derives its tolerance from the
standard errors of the estimates it checks.
"""

import json
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceEnum_ELBO, TraceGraph_ELBO, infer_discrete
from scipy.optimize import linear_sum_assignment
from sklearn.datasets import load_iris
from sklearn.mixture import GaussianMixture

from zoo.cli import main
from zoo.data import Data, load_data
from zoo.errors import ZooError
from zoo.experiment import make_config
from zoo.guides.gmm import AmortizedGuide, EnumerateGuide, quadratic_features
from zoo.models import gmm
from zoo.models.gmm import GMM, SCALE_FLOOR
from zoo.objectives import make_objective
from zoo.registry import build, get_model
from zoo.train import TrainSettings, fit, seed_everything

f64 = torch.float64
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The fits here are thousands of steps of tiny tensor operations, where a second torch
    thread only adds synchronization: on a busy two-core machine it made this file six times
    slower. The previous setting is restored for the other test files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_parameters(K, D, covariance, dtype=f64):
    """Weights, well-spread means and random covariances [K, D, D] (diagonal for diag)."""
    weights = torch.softmax(torch.randn(K, dtype=dtype), 0)
    means = 3 * torch.randn(K, D, dtype=dtype)
    A = torch.randn(K, D, D, dtype=dtype)
    covariances = A @ A.transpose(-1, -2) / D + 0.3 * torch.eye(D, dtype=dtype)
    if covariance == "diag":
        covariances = torch.diag_embed(covariances.diagonal(dim1=-2, dim2=-1))
    return weights, means, covariances


def random_model(K, D, covariance, x, prior="none", parameters=None):
    """A float64 GMM standardized with x's columns, at the given or random parameters."""
    model = GMM(D, K, covariance, prior).double()
    with torch.no_grad():
        model.shift.copy_(x.mean(0))
        model.scale_in.copy_(x.std(0))
        model.num_data.fill_(x.shape[0])
    model.set_parameters(*(parameters or random_parameters(K, D, covariance)))
    return model


def sklearn_at(model):
    """A scikit-learn GaussianMixture holding the model's parameters (no fitting)."""
    K, cov = model.components, model.covariance
    sk = GaussianMixture(K, covariance_type=cov)
    sk.weights_ = model.weights.detach().numpy()
    sk.means_ = model.means.detach().numpy()
    covariances = model.covariances.detach()
    if cov == "full":
        sk.covariances_ = covariances.numpy()
        L = torch.linalg.cholesky(covariances)
        eye = torch.eye(model.data_dim, dtype=covariances.dtype)
        sk.precisions_cholesky_ = torch.linalg.solve_triangular(L, eye, upper=False
                                                                ).transpose(-1, -2).numpy()
    else:
        variances = covariances.diagonal(dim1=-2, dim2=-1)
        sk.covariances_ = variances.numpy()
        sk.precisions_cholesky_ = variances.rsqrt().numpy()
    return sk


def em(x, K, covariance):
    """scikit-learn's EM, best of ten k-means initializations, in float64."""
    return GaussianMixture(K, covariance_type=covariance, n_init=10, random_state=0
                           ).fit(x.double().numpy())


# --- closed forms against scikit-learn and brute force ---------------------------------------

@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_closed_forms_match_sklearn_and_brute_force(covariance):
    K, D, N = 4, 3, 50
    x = 3 * torch.randn(N, D, dtype=f64) + torch.tensor([10.0, -5.0, 0.0], dtype=f64)
    weights, means, covariances = parameters = random_parameters(K, D, covariance)
    model = random_model(K, D, covariance, x, parameters=parameters)
    # the parameters read back in the data's units
    torch.testing.assert_close(model.weights.detach(), weights)
    torch.testing.assert_close(model.means.detach(), means)
    torch.testing.assert_close(model.covariances.detach(), covariances)
    sk = sklearn_at(model)
    with torch.no_grad():
        # brute force: sum_k pi_k N(x | mu_k, Sigma_k), straight from the definition
        dense = dist.MultivariateNormal(model.means, model.covariances)
        brute = (model.weights * dense.log_prob(x[:, None, :]).exp()).sum(-1).log()
        torch.testing.assert_close(model.marginal_log_prob(x), brute, atol=1e-10, rtol=0)
        torch.testing.assert_close(model.marginal_log_prob(x),
                                   torch.from_numpy(sk.score_samples(x.numpy())),
                                   atol=1e-10, rtol=0)
        gamma = model.responsibilities(x)
        torch.testing.assert_close(gamma.sum(-1), torch.ones(N, dtype=f64), atol=1e-12, rtol=0)
        torch.testing.assert_close(gamma, torch.from_numpy(sk.predict_proba(x.numpy())),
                                   atol=1e-10, rtol=0)
        assert model.bic(x) == pytest.approx(sk.bic(x.numpy()), abs=1e-8)
        assert torch.equal(model.assignments(x), torch.from_numpy(sk.predict(x.numpy())))


@pytest.mark.parametrize("covariance", ["full", "diag"])
@pytest.mark.parametrize("prior", ["none", "weak"])
def test_enumerated_loss_is_the_negative_log_joint(covariance, prior):
    K, D, N = 3, 3, 40
    x = torch.randn(N, D, dtype=f64) * torch.tensor([1.0, 5.0, 0.2], dtype=f64)
    model = random_model(K, D, covariance, x, prior)
    with torch.no_grad():
        log_px = model.marginal_log_prob(x)
        log_prior = 0.0
        if prior == "weak":  # from the covariances in the data's units, not the model's factors
            sd = x.std(0)
            Sigma = model.covariances
            correlation = Sigma / (Sigma.diagonal(dim1=-2, dim2=-1).sqrt()[:, :, None]
                                   * Sigma.diagonal(dim1=-2, dim2=-1).sqrt()[:, None, :])
            log_prior = (dist.Dirichlet(torch.full((K,), 2.0, dtype=f64)).log_prob(model.weights)
                         + dist.Normal(x.mean(0), 10 * sd).log_prob(model.means).sum())
            if covariance == "full":
                log_prior = log_prior + dist.LKJCholesky(D, 2.0).log_prob(
                    torch.linalg.cholesky(correlation)).sum()
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    loss = elbo.differentiable_loss(model, EnumerateGuide(D, K), x)
    torch.testing.assert_close(loss, -(log_px.sum() + log_prior), atol=1e-9, rtol=0)
    # a minibatch of B rows carries B / N of the log prior: nats per data point stay comparable
    batch = x[:10]
    loss = elbo.differentiable_loss(model, EnumerateGuide(D, K), batch)
    torch.testing.assert_close(loss, -(log_px[:10].sum() + log_prior * 10 / N),
                               atol=1e-9, rtol=0)


def test_hard_assignments_are_what_infer_discrete_returns():
    x = torch.randn(60, 2, dtype=f64) * 3
    model = random_model(3, 2, "full", x)
    decoded = infer_discrete(model, first_available_dim=-2, temperature=0)
    trace = pyro.poutine.trace(decoded).get_trace(x)
    assert torch.equal(trace.nodes["z"]["value"], model.assignments(x))
    assert len(set(model.assignments(x).tolist())) > 1


# --- the amortized guide against the exact posterior ------------------------------------------

@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_exact_amortized_guide_makes_the_elbo_tight(covariance):
    K, D, N = 3, 3, 30
    x = torch.randn(N, D, dtype=f64) * 2 + 1
    model = random_model(K, D, covariance, x)
    exact = AmortizedGuide.best_for(model)
    with torch.no_grad():
        torch.testing.assert_close(exact.log_responsibilities(x), model.log_responsibilities(x),
                                   atol=1e-10, rtol=0)
        metrics = model.metrics(exact, x)
    assert metrics["responsibility_kl"] == pytest.approx(0.0, abs=1e-10)
    assert metrics["elbo"] == pytest.approx(metrics["log_likelihood"], abs=1e-10)
    # TraceEnum_ELBO sums the guide's site over its K values: the exact ELBO, here log p(x)
    loss = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(model, exact, x)
    torch.testing.assert_close(loss, -model.marginal_log_prob(x).sum().detach(),
                               atol=1e-9, rtol=0)


def test_elbo_of_any_guide_is_log_likelihood_minus_responsibility_kl():
    K, D, N = 3, 2, 25
    x = torch.randn(N, D, dtype=f64)
    model = random_model(K, D, "full", x)
    guide = AmortizedGuide(D, K).double()
    with torch.no_grad():
        guide.encoder.weight.normal_()
        q = guide.responsibilities(x)
        gamma = model.responsibilities(x)
        kl = (q * (q.log() - gamma.log())).sum(-1)
        metrics = model.metrics(guide, x)
    assert metrics["responsibility_kl"] == pytest.approx(kl.mean().item(), abs=1e-10)
    assert metrics["responsibility_kl"] > 0.1
    log_px = model.marginal_log_prob(x).detach()
    assert metrics["elbo"] == pytest.approx((log_px - kl).mean().item(), abs=1e-10)
    loss = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(model, guide, x)
    torch.testing.assert_close(loss, -(log_px - kl).sum(), atol=1e-9, rtol=0)


def test_quadratic_features():
    u = torch.tensor([[1.0, 2.0, 3.0]])
    torch.testing.assert_close(quadratic_features(u),
                               torch.tensor([[1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 4.0, 6.0, 9.0]]))


def test_score_function_gradient_is_unbiased_and_noisier_than_enumeration():
    """The gradient of TraceGraph_ELBO (one draw of z per row, score function with the guide's
    baseline) averages to the exact gradient, which TraceEnum_ELBO computes by summing the
    guide's site over its K values, and only the former varies from call to call."""
    K, D, N, S = 3, 2, 40, 100
    x = torch.randn(N, D, dtype=f64) * 3
    model = random_model(K, D, "full", x)
    guide = AmortizedGuide(D, K).double()
    with torch.no_grad():
        guide.encoder.weight.normal_(0, 0.5)
        guide.baseline_net.bias.fill_(-5.0)
    parameters = dict(model.named_parameters()) | {
        f"encoder.{name}": value for name, value in guide.encoder.named_parameters()}

    def gradients(elbo):
        for value in parameters.values():
            value.grad = None
        elbo.loss_and_grads(model, guide, x)
        return torch.cat([value.grad.flatten() for value in parameters.values()])

    exact = gradients(TraceEnum_ELBO(max_plate_nesting=1))
    assert torch.equal(exact, gradients(TraceEnum_ELBO(max_plate_nesting=1)))
    pyro.set_rng_seed(0)
    with pytest.warns(UserWarning, match="If you want to enumerate"):  # it samples z instead
        draws = torch.stack([gradients(TraceGraph_ELBO(max_plate_nesting=1))
                             for _ in range(S)])
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(S)
    structural = (draws == 0).all(0)        # the upper triangles of the unconstrained factors
    assert structural.sum() == K and (exact[structural] == 0).all()
    assert (se[~structural] > 0).all()                      # every other entry is noisy ...
    assert ((mean - exact).abs() <= 5 * se).all()           # ... and unbiased


# --- fits with the default settings ----------------------------------------------------------

def fit_with_defaults(data: Data, covariance: str, guide: str = "enumerate"):
    """Model and guide built and trained on all of data's rows as ``zoo train gmm`` builds and
    trains them (:func:`zoo.experiment.build_experiment`), with the registry's defaults."""
    config = make_config("gmm", guide=guide, options={"covariance": covariance})
    settings = TrainSettings(**config["train"], quiet=True)
    seed_everything(settings.seed)
    model, guide = build(get_model("gmm"), guide, data, config["options"])
    fit(model, guide, make_objective(**config["objective"]), (data.x_train,), settings=settings)
    return model, guide


def _iris() -> Data:
    x = torch.from_numpy(load_iris().data).float()
    return Data("iris", (x - x.mean(0)) / x.std(0), None, None, None)


@pytest.fixture(scope="module")
def synthetic():
    return load_data("synthetic-gmm", test_fraction=0)


@pytest.fixture(scope="module")
def synthetic_fit(synthetic):
    return fit_with_defaults(synthetic, "full")[0]


@pytest.mark.parametrize("dataset, covariance", [
    ("synthetic-gmm", "full"), ("synthetic-gmm", "diag"), ("iris", "full"), ("iris", "diag")])
def test_defaults_reach_the_log_likelihood_of_em(dataset, covariance, synthetic, synthetic_fit):
    data = synthetic if dataset == "synthetic-gmm" else _iris()
    if (dataset, covariance) == ("synthetic-gmm", "full"):
        model = synthetic_fit
    else:
        model = fit_with_defaults(data, covariance)[0]
    x = data.x_train
    with torch.no_grad():
        ours = model.marginal_log_prob(x).mean().item()
    assert ours == pytest.approx(em(x, 3, covariance).score(x.double().numpy()), abs=0.01)


def test_parameters_match_the_truth_up_to_a_permutation(synthetic, synthetic_fit):
    truth, model, N = synthetic.truth, synthetic_fit, synthetic.num_train
    with torch.no_grad():
        weights, means, covariances = (t.double() for t in (model.weights, model.means,
                                                            model.covariances))
    true_weights, true_means, true_covariances = (truth[key].double() for key in
                                                  ("weights", "means", "covariances"))
    rows, columns = linear_sum_assignment(torch.cdist(true_means, means).numpy())
    order = torch.as_tensor(columns)[np.argsort(rows)]
    weights, means, covariances = weights[order], means[order], covariances[order]
    # standard errors: multinomial counts; the mean and covariance of n_k = N pi_k Gaussian draws
    n = N * true_weights
    weight_se = (true_weights * (1 - true_weights) / N).sqrt()
    variances = true_covariances.diagonal(dim1=-2, dim2=-1)
    mean_se = (variances / n[:, None]).sqrt()
    covariance_se = ((variances[:, :, None] * variances[:, None, :] + true_covariances**2)
                     / n[:, None, None]).sqrt()
    assert ((weights - true_weights).abs() < 4 * weight_se).all()
    assert ((means - true_means).abs() < 4 * mean_se).all()
    assert ((covariances - true_covariances).abs() < 4 * covariance_se).all()


def test_amortized_guide_learns_the_responsibilities(synthetic):
    """On well-separated data the default amortized fit gets within 0.05 nats of the exact
    responsibilities (a uniform q is about 1 nat away) and within 0.01 nats of EM."""
    model, guide = fit_with_defaults(synthetic, "full", guide="amortized")
    x = synthetic.x_train
    with torch.no_grad():
        metrics = model.metrics(guide, x)
        uniform = model.metrics(AmortizedGuide.for_data(synthetic, components=3), x)
    assert uniform["responsibility_kl"] > 0.9
    assert metrics["responsibility_kl"] < 0.05
    assert metrics["elbo"] == pytest.approx(metrics["log_likelihood"]
                                            - metrics["responsibility_kl"], abs=1e-5)
    em_log_likelihood = em(x, 3, "full").score(x.double().numpy())
    assert metrics["log_likelihood"] == pytest.approx(em_log_likelihood, abs=0.01)


def test_restarts_keep_the_best_candidate():
    x = _iris().x_train
    model = GMM(4, 3, "full")
    model.initialize_from_data(x, restarts=5, generator=torch.Generator().manual_seed(3))
    # the same five candidates again, from the same generator
    generator = torch.Generator().manual_seed(3)
    u = ((x.double() - x.double().mean(0)) / x.double().std(0))
    candidates = [gmm.cluster_moments(u, gmm.lloyd(u, gmm.kmeans_plus_plus(u, 3, generator)),
                                      3, "full") for _ in range(5)]
    stacked = (torch.stack(column) for column in zip(*candidates, strict=True))
    *_, log_likelihoods = gmm.refine(u, *stacked, "full")
    assert log_likelihoods.max() - log_likelihoods.min() > 0.01    # the choice matters here
    with torch.no_grad():
        chosen = model.marginal_log_prob(x).mean() + x.double().std(0).log().sum()
    assert chosen.item() == pytest.approx(log_likelihoods.max().item(), abs=1e-4)


def test_variance_floor_warns_when_it_binds():
    x = torch.randn(50, 2, dtype=f64)
    model = random_model(2, 2, "diag", x)
    assert not model.warn_if_floor_binds()
    variances = model.covariances.detach().clone()
    variances[1] = torch.diag((1.2 * SCALE_FLOOR * x.std(0)) ** 2)
    model.set_parameters(covariances=variances)
    with pytest.warns(UserWarning, match=r"variance floor binds for component\(s\) 1"):
        assert model.warn_if_floor_binds()
    assert torch.isfinite(model.marginal_log_prob(x)).all()
    with pytest.raises(ZooError, match="below the variance floor"):
        model.set_parameters(covariances=variances / 4)


# --- the zoo command ---------------------------------------------------------------------------

TINY = ["--steps", "40", "--restarts", "2", "--test-fraction", "0", "--quiet"]


def test_train_evaluate_and_plot_through_the_command(tmp_path, capsys):
    run = tmp_path / "enumerate"
    assert main(["train", "gmm", "--components", "3", "--covariance", "diag", "--out",
                 str(run), *TINY]) == 0
    assert main(["evaluate", str(run), "--json"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--json"]) == 0
    train = json.loads(capsys.readouterr().out)["train"]
    assert {"log_likelihood", "elbo", "bic"} <= set(train)
    assert train["elbo"] == train["log_likelihood"]         # enumeration is exact
    x = load_data("synthetic-gmm", test_fraction=0).x_train
    sk = em(x, 3, "diag")
    assert train["log_likelihood"] == pytest.approx(sk.score(x.double().numpy()), abs=0.05)
    assert train["bic"] == pytest.approx(sk.bic(x.double().numpy()), rel=0.01)
    assert main(["plot", str(run), "--kind", "components"]) == 0
    figure = run / "figures" / "components.png"
    assert capsys.readouterr().out.strip() == str(figure)
    assert figure.read_bytes().startswith(PNG_SIGNATURE)

    run = tmp_path / "amortized"
    assert main(["train", "gmm", "--guide", "amortized", "--out", str(run), *TINY]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--json"]) == 0
    train = json.loads(capsys.readouterr().out)["train"]
    assert 0 < train["responsibility_kl"]
    assert train["elbo"] == pytest.approx(train["log_likelihood"] - train["responsibility_kl"],
                                          abs=1e-4)
    assert main(["plot", str(run), "--kind", "components"]) == 0


def test_user_table_with_many_columns(tmp_path, capsys):
    path = tmp_path / "iris.npy"
    np.save(path, load_iris().data)
    run = tmp_path / "run"
    assert main(["train", "gmm", "--data", str(path), "--out", str(run), *TINY]) == 0
    assert main(["plot", str(run), "--kind", "components"]) == 0
    assert (run / "figures" / "components.png").read_bytes().startswith(PNG_SIGNATURE)


def test_train_with_a_test_split_reports_the_exact_test_loss(tmp_path):
    """With enumeration the test loss is the exact negative log-likelihood per test point."""
    run = tmp_path / "run"
    assert main(["train", "gmm", "--steps", "5", "--restarts", "1", "--quiet", "--out",
                 str(run)]) == 0
    from zoo.experiment import load_run
    from zoo.runs import read_metrics

    experiment = load_run(run)
    x_test = experiment.data.x_test
    with torch.no_grad():
        exact = -experiment.model.marginal_log_prob(x_test).mean().item()
    assert read_metrics(run)[-1]["test_loss"] == pytest.approx(exact, rel=1e-5)


def test_train_amortized_with_the_score_function(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "gmm", "--guide", "amortized", "--loss", "tracegraph", "--out",
                 str(run), *TINY]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["train"]["responsibility_kl"] >= 0
    assert result["train"]["elbo"] <= result["train"]["log_likelihood"] + 1e-6


# --- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--components", "0"], "--components must be a positive integer"),
    (["--components", "2000"], "--components K = 2000 is more than the N = 1500 training rows"),
    (["--covariance", "spherical"], "--covariance must be one of: full, diag"),
    (["--restarts", "0"], "--restarts must be a positive integer"),
    (["--latent-dim", "2"], "--latent-dim does not apply to model gmm"),
])
def test_bad_options_through_the_command(capsys, argv, message):
    assert main(["train", "gmm", "--test-fraction", "0", "--quiet", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("zoo: error: ") and message in err and "\n" not in err


def test_bad_tables():
    model = GMM(1, 2)
    with pytest.raises(ZooError, match=r"table of shape \[N, D\]; got shape \[10\].*x\[:, None\]"):
        model.initialize_from_data(torch.randn(10))
    with pytest.raises(ZooError, match=r"shape \[N, D = 1\]"):
        model.marginal_log_prob(torch.randn(10, 2))
    with pytest.raises(ZooError, match=r"column\(s\) 1 \(0-based\) .* constant.*drop"):
        GMM(3, 2).initialize_from_data(torch.cat([torch.randn(20, 1), torch.ones(20, 1),
                                                  torch.randn(20, 1)], 1))
    with pytest.raises(ZooError, match="NaN or infinite"):
        GMM(2, 2).initialize_from_data(torch.tensor([[0.0, 1.0], [float("nan"), 2.0],
                                                     [1.0, 0.0]]))
    with pytest.raises(ZooError, match="K = 3 is more than the N = 2 training rows"):
        GMM(2, 3).initialize_from_data(torch.randn(2, 2))
    with pytest.raises(ZooError, match="fewer than K = 3 distinct rows"):
        GMM(2, 3).initialize_from_data(torch.tensor([[0.0, 1.0], [1.0, 0.0]]).repeat(5, 1))
    with pytest.raises(ZooError, match="--components must be a positive integer"):
        GMM(2, 0)
    with pytest.raises(ZooError, match="prior must be one of: none, weak"):
        GMM(2, 2, prior="strong")
