r"""Diagnostics of an amortized guide against the exact posterior, stored and drawn with ArviZ.

For a trained model and guide and a few data points x_1, ..., x_N, :func:`diagnose` compares the
guide's q(z | x_n) with the posterior p(z | x_n) of the trained model, point by point. This
package is the only part of zoo that imports ArviZ. One module per job:

- :mod:`~zoo.diagnostics.reference`: draws from the guide, and the reference posterior. Where
  the model knows it in closed form (``model.posterior(x)``, a torch distribution: PPCA, the
  expnormal teaching model), exact draws; for a mixture, ``model.responsibilities(x)``;
  elsewhere (VAE, CVAE) long runs of NUTS on p(z | x) proportional to p(x, z), the model's own
  program conditioned on the first few points, which :func:`nuts_posterior` makes trustworthy
  by reproducing PPCA's closed form in the tests.
- :mod:`~zoo.diagnostics.distances`, per data point: ``posterior_kl``
  (:func:`zoo.objectives.posterior_kl`), KL(q || p) in closed
  form where torch knows one (Gaussian pairs, the expnormal guides), else E_q[log q -
  log p(z | x)] by Monte Carlo, else (no closed-form posterior) log p(x) - ELBO with log p(x)
  importance-sampled; ``mean_error``, ``sd_error``: root mean squares over latent dimensions
  of E_q z - E_p z and of sd_q z - sd_p z; ``wasserstein``: the 2-Wasserstein distance of the
  Gaussians with q's and p's means and covariances.
- :mod:`~zoo.diagnostics.importance`, per data point, with S draws z_s ~ q(z | x_n) and log
  weights log w_s = log p(x_n, z_s) - log q(z_s | x_n): ``khat``, the PSIS Pareto shape of the
  weights' tail (ArviZ's ``psislw``; points with equal weights count as exact,
  ``khat_exact``, and those without a fitted tail in ``khat_unfitted``, both outside
  ``khat_max`` and ``khat_mean``), and ``ess`` = (sum_s w_s)^2 / sum_s w_s^2, out of S.
- :mod:`~zoo.diagnostics.gaps`: the amortization gap (Cremer, Li & Duvenaud 2018):
  log p(x) - ELBO(q) splits into ``approximation_gap`` = log p(x) - ELBO(q*), q* the member of
  q's family fitted to this x alone, and ``amortization_gap`` = ELBO(q*) - ELBO(q).
- :mod:`~zoo.diagnostics.calibration`, over all the points: simulation-based calibration
  (Talts et al. 2018; for variational inference Yao et al. 2018): draw z* from the prior and x
  from p(x | z*), draw L times from q(z | x) and rank z* among the draws in each latent
  dimension. If q(z | x) is the posterior, the rank is uniform on {0, ..., L}; a chi-square
  test of the binned ranks gives ``sbc_pvalue`` (Bonferroni over latent dimensions). A guide
  too narrow piles the ranks at both ends, one too wide in the middle, a biased one on one
  side. Amortization makes this cheap: one pass of the encoder over all simulations.
- :mod:`~zoo.diagnostics.inference_data`: the ``arviz.InferenceData`` that stores it all,
  saved as NetCDF; :mod:`~zoo.diagnostics.figures`: its figures;
  :mod:`~zoo.diagnostics.diagnose`: every stage at once; :mod:`~zoo.diagnostics.run`:
  ``zoo diagnose`` on a trained run folder.

What a model and a guide must provide is the contract of :mod:`zoo.contract`: the latent site
``LATENT`` in the plate ``"data"``, and the capabilities they declare (an exact posterior or
marginal, the guide's distribution, a discrete posterior) decide which diagnostics run.
"""

from zoo.contract import LATENT
from zoo.diagnostics.calibration import (
    Calibration,
    chi_square_uniformity,
    simulation_based_calibration,
)
from zoo.diagnostics.diagnose import STAGES, Diagnostics, diagnose, summarize
from zoo.diagnostics.distances import gaussian_wasserstein, moments, sample_moments
from zoo.diagnostics.figures import (
    FIGURES,
    draw_figures,
    omitted_figures,
    plot_forest,
    plot_gaps,
    plot_khat,
    plot_marginals,
    plot_pairs,
    plot_ranks,
)
from zoo.diagnostics.gaps import Gaps, LocalGuide, amortization_gaps
from zoo.diagnostics.importance import (
    ImportanceDiagnostics,
    importance_diagnostics,
    pareto_smooth,
)
from zoo.diagnostics.inference_data import to_inference_data
from zoo.diagnostics.reference import (
    GuideDraws,
    Reference,
    guide_draws,
    nuts_posterior,
    reference_posterior,
)
from zoo.diagnostics.run import DIAGNOSTIC_PLOTS, NETCDF, SUMMARY, diagnose_run, write_summary
from zoo.diagnostics.settings import DiagnosticSettings
from zoo.objectives import posterior_kl

__all__ = [
    "DIAGNOSTIC_PLOTS", "FIGURES", "LATENT", "NETCDF", "STAGES", "SUMMARY", "Calibration",
    "DiagnosticSettings", "Diagnostics", "Gaps", "GuideDraws",
    "ImportanceDiagnostics", "LocalGuide", "Reference", "amortization_gaps",
    "chi_square_uniformity", "diagnose", "diagnose_run", "draw_figures", "gaussian_wasserstein",
    "guide_draws", "importance_diagnostics", "moments", "nuts_posterior",
    "omitted_figures", "pareto_smooth", "plot_forest", "plot_gaps", "plot_khat",
    "plot_marginals", "plot_pairs", "plot_ranks", "posterior_kl", "reference_posterior",
    "sample_moments", "simulation_based_calibration", "summarize", "to_inference_data",
    "write_summary",
]
