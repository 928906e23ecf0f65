"""Simulation-based calibration of an amortized guide (Talts et al. 2018; for variational
inference Yao et al. 2018): the ranks of prior draws z* among guide draws given x ~ p(x | z*)
are uniform when q(z | x) is the posterior."""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from torch import Tensor

from zoo.contract import LATENT
from zoo.errors import ZooError
from zoo.objectives import PARTICLE_PLATE


@dataclass
class Calibration:
    """Ranks ``[R, M]`` in {0, ..., L} of R simulated z* among L guide draws each, the binned
    counts ``[B, M]`` and the chi-square p-value of each latent dimension ``[M]``."""

    ranks: Tensor
    num_draws: int
    counts: Tensor
    pvalues: Tensor

    @property
    def pvalue(self) -> float:
        """The Bonferroni-corrected p-value over latent dimensions, min(1, M min_m p_m)."""
        return min(1.0, self.pvalues.numel() * self.pvalues.min().item())


def _observed_site(model, *inputs: Tensor) -> str:
    trace = poutine.trace(model).get_trace(*inputs)
    observed = [name for name, site in trace.nodes.items()
                if site["type"] == "sample" and site["is_observed"]]
    if len(observed) != 1:
        raise ZooError(f"simulation-based calibration needs a model with one observed site; "
                       f"this one has {observed or 'none'}")
    return observed[0]


def chi_square_uniformity(counts: Tensor) -> Tensor:
    """p-values of Pearson's chi-square test that counts ``[B, ...]`` come from B equally likely
    bins: P(chi2_{B-1} > sum_b (O_b - E)^2 / E), through the regularized upper incomplete gamma
    function."""
    counts = counts.double()
    expected = counts.sum(0) / counts.shape[0]
    statistic = ((counts - expected) ** 2 / expected).sum(0)
    degrees = torch.tensor(counts.shape[0] - 1, dtype=torch.float64, device=counts.device)
    return torch.special.gammaincc(degrees / 2, statistic / 2)


@torch.no_grad()
def simulation_based_calibration(model, guide, *inputs: Tensor, num_simulations: int = 1000,
                                 num_draws: int = 99, num_bins: int = 10) -> Calibration:
    """SBC of an amortized guide: z* ~ p(z), x ~ p(x | z*), L = ``num_draws`` draws from
    q(z | x), and the rank of z* among them in each latent dimension.

    The model runs unconditioned on copies of ``inputs`` (cycled to ``num_simulations`` rows):
    its observed site is sampled instead, and further inputs (labels) are kept. ``num_bins``
    must divide L + 1, so that every bin holds equally many ranks.
    """
    if (num_draws + 1) % num_bins:
        raise ZooError(f"the number of SBC bins ({num_bins}) must divide the number of possible "
                       f"ranks, draws + 1 = {num_draws + 1}")
    observed = _observed_site(model, *inputs)
    index = torch.arange(num_simulations, device=inputs[0].device) % inputs[0].shape[0]
    template = tuple(tensor[index] for tensor in inputs)
    trace = poutine.trace(poutine.uncondition(model)).get_trace(*template)
    z_true = trace.nodes[LATENT]["value"]                                      # [R, M]
    simulated = (trace.nodes[observed]["value"], *template[1:])
    with pyro.plate(PARTICLE_PLATE, num_draws, dim=-2):
        z = poutine.trace(guide).get_trace(*simulated).nodes[LATENT]["value"]  # [L, R, M]
    ranks = (z < z_true).sum(0)
    bins = ranks * num_bins // (num_draws + 1)
    counts = torch.stack([(bins == b).sum(0) for b in range(num_bins)])
    return Calibration(ranks, num_draws, counts, chi_square_uniformity(counts))

