"""Factor analysis against scikit-learn's ``FactorAnalysis`` (an SVD-based EM fit) as the
independent truth. The conformance checks (``tests/test_conformance.py``) cover the rest."""

import pytest
import torch
from sklearn.decomposition import FactorAnalysis as SklearnFA

from zoo.data import load_data
from zoo.errors import ZooError
from zoo.experiment import build_experiment, make_config
from zoo.models.fa import FactorAnalysis
from zoo.registry import build, get_model
from zoo.train import fit

f64 = torch.float64


def _at_sklearn_solution(x: torch.Tensor, latent_dim: int) -> tuple[FactorAnalysis, SklearnFA]:
    sk = SklearnFA(latent_dim, tol=1e-8, max_iter=10000, random_state=0).fit(x.numpy())
    model = FactorAnalysis(x.shape[1], latent_dim).double()
    with torch.no_grad():
        model.W.copy_(torch.as_tensor(sk.components_.T))
        model.b.copy_(torch.as_tensor(sk.mean_))
        model.psi = torch.as_tensor(sk.noise_variance_)
    return model, sk


def test_marginal_equals_scikit_learns_at_the_same_parameters():
    x = load_data("synthetic-ppca", test_fraction=0).x_train[:300].to(f64)
    model, sk = _at_sklearn_solution(x, 2)
    with torch.no_grad():
        torch.testing.assert_close(model.marginal_log_prob(x),
                                   torch.as_tensor(sk.score_samples(x.numpy())),
                                   rtol=1e-10, atol=1e-9)


@pytest.mark.slow
def test_svi_with_the_full_guide_reaches_the_maximum_likelihood_of_scikit_learn():
    """The registry's defaults train to convergence (about 3000 steps); the trained marginal
    likelihood is within 0.01 nats per point of scikit-learn's maximum, and not above it by more
    than its stopping tolerance; the model covariances W W^T + diag(psi) agree to 2 %."""
    experiment = build_experiment(make_config("fa", guide="full"), quiet=True)
    fit(experiment.model, experiment.guide, experiment.objective, experiment.train_inputs,
        settings=experiment.settings)
    x = experiment.data.x_train.to(f64)
    model = experiment.model.double()
    _, sk = _at_sklearn_solution(x, 2)
    with torch.no_grad():
        trained = model.marginal_log_prob(x).mean().item()
        covariance = model.W @ model.W.T + torch.diag(model.psi)
    best = sk.score(x.numpy())
    assert best - 0.01 < trained < best + 1e-4
    reference = torch.as_tensor(sk.get_covariance())
    assert (covariance - reference).norm() / reference.norm() < 0.02


def test_a_latent_size_outside_one_to_d_minus_one_is_refused_naming_the_flag():
    data = load_data("synthetic-ppca")
    for latent_dim in (0, data.data_dim):
        with pytest.raises(ZooError, match="--latent-dim must be between 1 and D-1"):
            build(get_model("fa"), None, data, {"latent_dim": latent_dim})
