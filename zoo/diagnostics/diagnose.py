"""Every diagnostic that applies to a model and guide at once: :func:`diagnose` runs the stages
(guide draws and PSIS, the reference posterior, SBC, the gaps) and gathers their per-point
metrics, their summary over points and the InferenceData."""

from __future__ import annotations

import math
from dataclasses import dataclass

import arviz as az
import torch
from torch import Tensor
from torch.distributions import Categorical, kl_divergence

from zoo.contract import DISCRETE_POSTERIOR, DISTRIBUTION, EXACT_MARGINAL, offers
from zoo.diagnostics.calibration import Calibration, simulation_based_calibration
from zoo.diagnostics.distances import moment_errors
from zoo.diagnostics.gaps import Gaps, amortization_gaps
from zoo.diagnostics.importance import ImportanceDiagnostics, importance_diagnostics
from zoo.diagnostics.inference_data import to_inference_data
from zoo.diagnostics.reference import GuideDraws, Reference, guide_draws, reference_posterior
from zoo.diagnostics.settings import DiagnosticSettings
from zoo.objectives import posterior_kl
from zoo.progress import progress_bar

STAGES = ("guide draws and PSIS", "reference posterior", "calibration (SBC)",
          "amortization gaps")
"""The stages of :func:`diagnose`, as its progress bar names them."""


@dataclass
class Diagnostics:
    """What :func:`diagnose` finds: the InferenceData, per-point metrics (``[N]`` float64 on the
    CPU each, NaN where a metric does not apply to a point), the aggregate ``summary`` (only
    the numbers that apply; None for one that is not finite, so that it is valid JSON), and the
    calibration and gaps for the figures."""

    idata: az.InferenceData
    per_point: dict[str, Tensor]
    summary: dict[str, float | int | None]
    calibration: Calibration | None = None
    gaps: Gaps | None = None
    importance: ImportanceDiagnostics | None = None


def diagnose(model, guide, *inputs: Tensor, points: Tensor | None = None,
             settings: DiagnosticSettings = DiagnosticSettings()) -> Diagnostics:
    """Every diagnostic that applies to this model and guide on the points ``inputs`` (the
    model's inputs, first dimension N), labelled ``points`` (default 0, ..., N - 1) in the
    InferenceData. Draws from torch's global generator: seed it first for reproducible
    numbers."""
    points = torch.arange(inputs[0].shape[0]) if points is None else points
    if offers(model, DISCRETE_POSTERIOR):
        return _diagnose_mixture(model, guide, *inputs, points=points, settings=settings)
    with progress_bar(len(STAGES), "diagnostics", quiet=settings.quiet, unit="stage") as stages:
        stages.set_postfix_str(STAGES[0])
        draws = guide_draws(model, guide, *inputs,
                            num_draws=settings.num_chains * settings.num_draws)
        stages.update(), stages.set_postfix_str(STAGES[1])
        reference = reference_posterior(model, *inputs, draws=draws, settings=settings)
        with torch.no_grad():
            q = guide.distribution(*inputs) if offers(guide, DISTRIBUTION) else None
            per_point = moment_errors(q, draws, reference)
        importance = importance_diagnostics(draws.log_weights)
        stages.update(), stages.set_postfix_str(STAGES[2])
        calibration = simulation_based_calibration(
            model, guide, *inputs, num_simulations=settings.sbc_simulations,
            num_draws=settings.sbc_draws, num_bins=settings.sbc_bins)
        stages.update(), stages.set_postfix_str(STAGES[3])
        gaps = amortization_gaps(model, guide, *inputs, settings=settings)
        stages.update()
    with torch.no_grad():
        if q is not None and reference.distribution is not None:
            per_point["posterior_kl"] = posterior_kl(q, reference.distribution)
        elif gaps is not None:
            per_point["posterior_kl"] = gaps.log_likelihood - gaps.elbo
    per_point["khat"], per_point["ess"] = importance.khat, importance.ess
    if gaps is not None:
        per_point.update(log_likelihood=gaps.log_likelihood, elbo=gaps.elbo,
                         optimal_elbo=gaps.optimal_elbo, approximation_gap=gaps.approximation,
                         amortization_gap=gaps.amortization)
    per_point = _as_reported(per_point)

    summary = summarize(per_point, importance, calibration, num_draws=draws.z.shape[0])
    idata = to_inference_data(model, inputs, points, draws, reference, per_point,
                              num_chains=settings.num_chains)
    return Diagnostics(idata, per_point, summary, calibration, gaps, importance)


def _as_reported(per_point: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-point metrics as they are stored and summarized: float64, on the CPU."""
    return {name: value.detach().double().cpu() for name, value in per_point.items()}


def summarize(per_point: dict[str, Tensor], importance: ImportanceDiagnostics | None,
              calibration: Calibration | None, *, num_draws: int
              ) -> dict[str, float | int | None]:
    """Means over points of the per-point metrics (over the points where they apply), and the
    k-hat, ESS and SBC aggregates, as valid JSON: k-hat aggregates leave out the exact points
    (``khat_exact``) and those without a fitted tail (``khat_unfitted``), and any other number
    that is not finite (an infinite KL, say) is None, which JSON writes as null."""
    summary: dict[str, float | int | None] = {"num_points": len(next(iter(per_point.values())))}
    for name in ("posterior_kl", "mean_error", "sd_error", "wasserstein", "log_likelihood",
                 "elbo", "approximation_gap", "amortization_gap"):
        values = per_point.get(name)
        if values is not None and not values.isnan().all():
            summary[name] = values.nanmean().item()
    if importance is not None:
        unfitted = ~importance.exact & importance.khat.isinf()
        fitted = importance.khat[~importance.exact & ~unfitted]
        if fitted.numel():
            summary["khat_max"] = fitted.max().item()
            summary["khat_mean"] = fitted.mean().item()
        summary["khat_exact"] = int(importance.exact.sum())
        summary["khat_unfitted"] = int(unfitted.sum())
        summary["ess_mean"] = importance.ess.mean().item()
        summary["num_draws"] = num_draws
    if calibration is not None:
        summary["sbc_pvalue"] = calibration.pvalue
    return {name: None if isinstance(value, float) and not math.isfinite(value) else value
            for name, value in summary.items()}


def _diagnose_mixture(model, guide, *inputs: Tensor, points: Tensor,
                      settings: DiagnosticSettings) -> Diagnostics:
    """Discrete z: the responsibilities r_nk = p(z_n = k | x_n) against the guide's
    ``responsibilities(x)``; a guide without them leaves z to exact enumeration in the model, so
    its q is p(z | x) itself. KL(q || p) is exact; the family of all categorical distributions
    contains p(z | x), so the approximation gap is 0 and the whole gap log p(x) - ELBO =
    KL(q || p) is amortization. PSIS and SBC are left out for enumerated assignments."""
    x = inputs[0]
    with torch.no_grad():
        exact = Categorical(probs=model.responsibilities(x))
        q = (Categorical(probs=guide.responsibilities(x)) if offers(guide, DISCRETE_POSTERIOR)
             else exact)
        S, C = settings.num_draws, settings.num_chains
        z_q, z_p = q.sample((C * S,)), exact.sample((C * S,))                  # [C S, N]
        kl = kl_divergence(q, exact).double()
        per_point: dict[str, Tensor] = {"posterior_kl": kl}
        log_q = q.log_prob(z_q)
        log_joint = None
        if offers(model, EXACT_MARGINAL):
            log_px = model.marginal_log_prob(x).double()
            log_joint = exact.log_prob(z_q) + log_px.to(log_q)
            per_point.update(log_likelihood=log_px, elbo=log_px - kl, optimal_elbo=log_px,
                             approximation_gap=torch.zeros_like(kl), amortization_gap=kl)
    per_point = _as_reported(per_point)
    if log_joint is None:
        log_joint = torch.full_like(log_q, math.nan)
    draws = GuideDraws(z_q, log_joint, log_q)
    reference = Reference(z_p.reshape(C, S, -1), torch.arange(len(points)), "closed form",
                          distribution=exact)
    summary = summarize(per_point, None, None, num_draws=C * S)
    gaps = (Gaps(per_point["log_likelihood"], per_point["elbo"], per_point["optimal_elbo"],
                 exact=True) if "log_likelihood" in per_point else None)
    idata = to_inference_data(model, inputs, points, draws, reference, per_point, num_chains=C)
    return Diagnostics(idata, per_point, summary, gaps=gaps)

