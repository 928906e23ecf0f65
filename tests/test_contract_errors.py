"""A model or guide that breaks the contract while a student edits it is refused when it is
built, in one line naming the file, the site and the fix (:mod:`zoo.conformance`)."""

import dataclasses

import pyro
import pyro.distributions as dist
import pytest
import torch

from zoo.contract import EXACT_MARGINAL, EXACT_POSTERIOR, MAXIMUM_LIKELIHOOD
from zoo.data import load_data
from zoo.errors import ZooError
from zoo.guides.fa import FullGuide
from zoo.models.fa import FactorAnalysis
from zoo.registry import build, get_model

FILE = "tests/test_contract_errors.py"


class NoToEvent(FactorAnalysis):
    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent_dim), 1.0))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, self.psi.sqrt()).to_event(1),
                        obs=x)


class OutsideThePlate(FullGuide):
    def forward(self, x):
        pyro.sample("z", self.distribution(x))


class WrongName(FullGuide):
    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("w", self.distribution(x))


class WrongSignature(FullGuide):
    def __init__(self, data_dim, hidden_dim):
        super().__init__(data_dim, hidden_dim)


class PromisesTooMuch(FactorAnalysis):
    offers = frozenset({EXACT_MARGINAL, EXACT_POSTERIOR, MAXIMUM_LIKELIHOOD})


def _built_with(model_class=FactorAnalysis, guide_class=FullGuide):
    entry = get_model("fa")

    def build_model(data, *, latent_dim):
        return model_class(data.data_dim, latent_dim)

    def build_guide(data, *, latent_dim):
        return guide_class(data.data_dim, latent_dim=latent_dim)

    edited = dataclasses.replace(entry, build_model=build_model, guides={"full": build_guide})
    return build(edited, None, load_data("synthetic-ppca"), {})


@pytest.mark.parametrize("model_class, guide_class, expected", [
    (NoToEvent, FullGuide, r"calling the model .* site z.*add \.to_event\(1\) to the "
                           r"distribution of site 'z'"),
    (FactorAnalysis, OutsideThePlate, r"site 'z' is outside the plate 'data': sample it inside"),
    (FactorAnalysis, WrongName, r"the guide samples site 'w', which the model does not have: "
                                r"name it 'z'"),
    (FactorAnalysis, WrongSignature, r"building the guide full of fa failed: .*unexpected "
                                     r"keyword argument 'latent_dim'"),
    (PromisesTooMuch, FullGuide, r"the model offers 'maximum likelihood' but has no method "
                                 r"maximum_likelihood"),
])
def test_a_broken_model_or_guide_is_refused_in_one_line(model_class, guide_class, expected):
    with pytest.raises(ZooError, match=expected) as refused:
        _built_with(model_class, guide_class)
    message = str(refused.value)
    assert FILE in message and "\n" not in message
    assert "Trace Shapes" not in message and refused.value.__cause__ is None


def test_the_registered_fa_passes_and_the_check_leaves_the_random_state_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    model, guide = _built_with()
    assert isinstance(model, FactorAnalysis)
    torch.manual_seed(0)
    build(get_model("fa"), None, load_data("synthetic-ppca"), {})
    torch.testing.assert_close(torch.rand(3) != expected, torch.ones(3, dtype=bool))
