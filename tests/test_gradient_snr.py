"""Gradient signal-to-noise: exact on a gradient of known distribution, and the finding of
Rainforth et al. (2018) on PPCA early in training."""

import pyro
import pytest
import torch

from zoo.errors import ZooError
from zoo.experiment import build_experiment, make_config
from zoo.objectives import gradient_snr, make_objective
from zoo.train import fit


class _KnownGradient:
    """loss = theta_guide . (mu_e + s_e eps) + theta_model . (mu_d + s_d eps'): each gradient is
    Normal(mu, s), so SNR = |mu| / s."""

    def __init__(self, encoder, decoder):
        self.encoder, self.decoder = encoder, decoder

    def differentiable_loss(self, model, guide, x):
        def noisy(mu, s):
            return mu + s * torch.randn_like(mu)
        return ((guide.weight * noisy(*self.encoder)).sum()
                + (model.weight * noisy(*self.decoder)).sum())


def test_snr_of_a_gradient_with_known_distribution():
    torch.manual_seed(0)
    model, guide = torch.nn.Linear(3, 1, bias=False), torch.nn.Linear(2, 1, bias=False)
    encoder = (torch.tensor([[1.0, -0.5]]), torch.tensor([[2.0, 0.25]]))  # SNR 0.5 and 2
    decoder = (torch.tensor([[3.0, 0.0, 1.0]]), torch.tensor([[1.0, 1.0, 0.5]]))  # 3, 0, 2
    snr = gradient_snr(model, guide, _KnownGradient(encoder, decoder), (torch.zeros(1),),
                       repeats=4000)
    # the sample SNR has standard error about sqrt((1 + SNR^2 / 2) / R) < 0.04 here
    torch.testing.assert_close(snr.encoder, torch.tensor([0.5, 2.0]), atol=0.1, rtol=0)
    torch.testing.assert_close(snr.decoder, torch.tensor([3.0, 0.0, 2.0]), atol=0.15, rtol=0)
    summary = snr.summary()
    assert summary["encoder_snr_mean"] == pytest.approx(snr.encoder.mean().item())
    with pytest.raises(ZooError, match="at least 2 repeats"):
        gradient_snr(model, guide, _KnownGradient(encoder, decoder), (torch.zeros(1),),
                     repeats=1)


@pytest.mark.slow
def test_iwae_encoder_snr_falls_and_dreg_keeps_it_up_on_ppca():
    config = make_config("ppca", guide="meanfield", train={"steps": 150})
    experiment = build_experiment(config, quiet=True)
    fit(experiment.model, experiment.guide, experiment.objective, experiment.train_inputs,
        settings=experiment.settings)
    batch = (experiment.data.x_train[:64],)

    def snr(name, particles, **options):
        pyro.set_rng_seed(0)
        objective = make_objective(name, num_particles=particles, **options)
        return gradient_snr(experiment.model, experiment.guide, objective, batch,
                            repeats=100).summary()

    iwae_1, iwae_16, dreg_16 = snr("iwae", 1), snr("iwae", 16), snr("dreg", 16)
    miwae_16 = snr("miwae", 16, num_groups=4)
    # measured (seed 0): encoder 0.29 -> 0.13 (iwae), 3.3 (dreg), 0.32 (miwae);
    # decoder 2.8 -> 13.8
    assert iwae_16["encoder_snr_mean"] < 0.7 * iwae_1["encoder_snr_mean"]
    assert iwae_16["decoder_snr_mean"] > 3 * iwae_1["decoder_snr_mean"]
    assert dreg_16["encoder_snr_mean"] > 5 * iwae_16["encoder_snr_mean"]
    assert miwae_16["encoder_snr_mean"] > 1.5 * iwae_16["encoder_snr_mean"]
