"""The diagnostics figures, drawn with ArviZ where it has the plot: marginals, pairs, forest,
k-hat, SBC ranks and the gaps."""

from __future__ import annotations

import math
import re
from functools import partial
from pathlib import Path

import arviz as az
import numpy as np
import xarray as xr
from matplotlib.figure import Figure
from torch import Tensor

from zoo import plots
from zoo.contract import LATENT
from zoo.diagnostics.calibration import Calibration
from zoo.diagnostics.diagnose import Diagnostics
from zoo.diagnostics.gaps import Gaps
from zoo.diagnostics.importance import KHAT_GOOD, KHAT_USABLE
from zoo.progress import progress_bar

Q_STYLE = {"color": "tab:red"}
P_STYLE = {"color": "black"}
TITLE_SIZE, LABEL_SIZE, TICK_SIZE = 10, 9, 8
"""Font sizes of every diagnostics panel (ArviZ scales its own with the figure)."""

FIGURES = ("diagnostics-marginals", "diagnostics-pair", "diagnostics-forest", "diagnostics-khat",
           "diagnostics-sbc", "diagnostics-gaps")
"""The figures :func:`draw_figures` can draw, by file name, in reading order."""

ZERO_GAP = 1e-12
"""Gaps below this many nats count as zero: the guide is the exact posterior."""


def _legible(ax) -> None:
    ax.tick_params(labelsize=TICK_SIZE)
    ax.xaxis.label.set_size(LABEL_SIZE)
    ax.yaxis.label.set_size(LABEL_SIZE)
    ax.title.set_size(TITLE_SIZE)


def _bars(ax, q: np.ndarray, p: np.ndarray, p_label: str, num_values: int) -> None:
    """Frequencies of the values 0, ..., ``num_values`` - 1 of a discrete z: q's bars (red)
    beside the reference's."""
    values = np.arange(num_values)
    for draws, offset, style, label in ((q, -0.2, Q_STYLE, "q(z|x)"), (p, 0.2, P_STYLE, p_label)):
        ax.bar(values + offset, np.bincount(draws, minlength=len(values)) / len(draws),
               width=0.4, label=label, **style)
    ax.set_xticks(values)
    ax.set_xlabel("component z")
    ax.set_ylabel("probability")
    ax.legend(fontsize="small")


def plot_marginals(idata: az.InferenceData, path: str | Path, *, max_points: int = 3,
                   max_dims: int = 3) -> Path:
    """Marginal densities of q(z_m | x_n) (red) over those of the reference (black), for the
    first few points (rows) and latent dimensions (columns), with ArviZ's ``plot_dist``; for a
    discrete z, the two distributions' bars side by side, one point beside the other."""
    reference = idata.reference_posterior[LATENT]
    method = idata.reference_posterior.attrs["method"]
    obs = reference.obs.values[:max_points]
    latent = reference.latent.values[:max_dims] if "latent" in reference.dims else [None]
    discrete = np.issubdtype(reference.dtype, np.integer)
    num_values = (int(max(idata.posterior[LATENT].max(), reference.max())) + 1 if discrete
                  else 0)
    shape = (1, len(obs)) if discrete else (len(obs), len(latent))
    figure = Figure(figsize=(3 * shape[1], 2.4 * shape[0] + 0.2), layout="constrained")
    axes = figure.subplots(*shape, squeeze=False)
    if discrete:              # the points side by side: axes[point, 0] as for a continuous z
        axes = axes.T
    for row, n in enumerate(obs):
        for column, m in enumerate(latent):
            where = {"obs": n} if m is None else {"obs": n, "latent": m}
            ax = axes[row, column]
            q, p = (group[LATENT].sel(where).values.ravel()
                    for group in (idata.posterior, idata.reference_posterior))
            if discrete:
                _bars(ax, q, p, method, num_values)
            else:
                az.plot_dist(q, ax=ax, label="q(z|x)", **Q_STYLE)
                az.plot_dist(p, ax=ax, label=method, **P_STYLE)
                ax.set_xlabel(f"z{m + 1}" if m is not None else "z")
            ax.set_title(f"point {n}" + ("" if m is None else f", z{m + 1}"))
            if row or column:
                ax.get_legend().remove()
            _legible(ax)
    return plots.save_figure(figure, path)


def plot_pairs(idata: az.InferenceData, path: str | Path) -> Path | None:
    """Joint draws of (z1, z2) from q (red) and the reference (black) for the first point, with
    the reference mean as ``plot_pair``'s reference value; None when M < 2."""
    reference = idata.reference_posterior[LATENT]
    if "latent" not in reference.dims or reference.sizes["latent"] < 2:
        return None
    coords = {"obs": [reference.obs.values[0]], "latent": [0, 1]}
    mean = reference.sel(coords).mean(("chain", "draw")).values
    figure = Figure(figsize=(4.5, 4.5))
    ax = figure.subplots()
    az.plot_pair(idata, group="reference_posterior", var_names=[LATENT], coords=coords, ax=ax,
                 scatter_kwargs={**P_STYLE, "alpha": 0.3})
    az.plot_pair(idata, var_names=[LATENT], coords=coords, ax=ax,
                 scatter_kwargs={**Q_STYLE, "alpha": 0.3},
                 reference_values={LATENT: mean})
    ax.set_xlabel("z1")
    ax.set_ylabel("z2")
    ax.set_title(f"point {coords['obs'][0]}: q (red), {idata.reference_posterior.attrs['method']}"
                 f" (black)")
    _legible(ax)
    return plots.save_figure(figure, path)


def _point_label(text: str) -> str:
    """ArviZ's ``z[n, m]`` (or ``[n, m]``, ``z[n]``) as ``point n, zm+1``."""
    match = re.search(r"\[(\d+)(?:, (\d+))?\]", text)
    if match is None:
        return text
    n, m = match.groups()
    return f"point {n}" + ("" if m is None else f", z{int(m) + 1}")


def plot_forest(idata: az.InferenceData, path: str | Path, *, max_points: int = 6,
                max_dims: int = 4) -> Path:
    """Means and 94% HDIs of q and the reference side by side, with ArviZ's ``plot_forest``."""
    reference = idata.reference_posterior
    coords = {"obs": reference.obs.values[:max_points]}
    if "latent" in reference.dims:
        coords["latent"] = reference.latent.values[:max_dims]
    figure = Figure(figsize=(6, 1 + 0.45 * np.prod([len(v) for v in coords.values()])))
    ax = figure.subplots()
    az.plot_forest([idata.posterior[[LATENT]], reference[[LATENT]]],
                   model_names=["q(z|x)", reference.attrs["method"]], var_names=[LATENT],
                   coords=coords, combined=True, hdi_prob=0.94, ax=ax,
                   colors=[Q_STYLE["color"], P_STYLE["color"]])
    ax.set_yticks(ax.get_yticks(), [_point_label(label.get_text())
                                    for label in ax.get_yticklabels()])
    ax.set_title(f"means and 94% HDIs of z: q(z|x) (red), {reference.attrs['method']} (black)")
    ax.set_xlabel("z")
    _legible(ax)
    return plots.save_figure(figure, path)


def plot_khat(khat: Tensor, exact: Tensor, obs: np.ndarray, path: str | Path) -> Path:
    """PSIS k-hat per point with ArviZ's ``plot_khat`` and the 0.5 / 0.7 thresholds, labelled;
    points whose weights are all equal (exact q) have no tail and are listed in the title
    instead."""
    values = khat.cpu().numpy().copy()
    values[exact.cpu().numpy()] = np.nan
    pareto_k = xr.DataArray(values, dims=["obs"], coords={"obs": obs})
    figure = Figure(figsize=(6, 3.5))
    ax = figure.subplots()
    az.plot_khat(az.ELPDData(data=[pareto_k, KHAT_USABLE], index=["pareto_k", "good_k"]),
                 ax=ax, show_hlines=False)
    ax.axhline(KHAT_GOOD, color="tab:orange", linestyle=":",
               label=f"{KHAT_GOOD}: good below")
    ax.axhline(KHAT_USABLE, color="tab:red", linestyle="--",
               label=f"{KHAT_USABLE}: unreliable above")
    ax.legend(fontsize="small")
    ax.set_xticks(obs)
    ax.set_xlabel("data point")
    ax.set_ylabel("k-hat")
    exact_count = int(exact.sum())
    ax.set_title("PSIS k-hat of log p(x, z) - log q(z | x)"
                 + (f"; {exact_count} points exact (equal weights)" if exact_count else ""))
    _legible(ax)
    return plots.save_figure(figure, path)


def plot_ranks(calibration: Calibration, path: str | Path, *, max_dims: int = 8,
               columns: int = 4) -> Path:
    """SBC rank histograms per latent dimension, ``columns`` to a row, with the expected count
    and the band that holds 99% of the counts of a uniform rank (normal approximation to the
    binomial)."""
    counts = calibration.counts[:, :max_dims].double().cpu()
    B, M = counts.shape
    R = calibration.ranks.shape[0]
    expected = R / B
    band = 2.576 * math.sqrt(R * (1 / B) * (1 - 1 / B))
    rows, width = math.ceil(M / columns), min(M, columns)
    figure = Figure(figsize=(2.8 * width, 2.4 * rows + 0.4), layout="constrained")
    axes = figure.subplots(rows, width, squeeze=False).ravel()
    for m, ax in enumerate(axes):
        if m >= M:
            ax.set_axis_off()
            continue
        ax.axhspan(expected - band, expected + band, color="grey", alpha=0.25)
        ax.axhline(expected, color="black", linewidth=1)
        ax.bar(np.arange(B), counts[:, m].numpy(), width=0.9, color=Q_STYLE["color"])
        ax.set_xticks(np.arange(B))
        ax.set_title(f"z{m + 1}: p = {calibration.pvalues[m].item():.3g}")
        ax.set_xlabel(f"rank bin (L = {calibration.num_draws})")
        _legible(ax)
    figure.suptitle(f"simulation-based calibration, {R} simulations")
    return plots.save_figure(figure, path)


def plot_gaps(gaps: Gaps, obs: np.ndarray, path: str | Path) -> Path | None:
    """log p(x) - ELBO per point as stacked bars: approximation gap below, amortization above;
    None when every gap is zero (see :func:`omitted_figures`)."""
    approximation = gaps.approximation.double().cpu().numpy()
    amortization = gaps.amortization.double().cpu().numpy()
    if max(np.abs(approximation).max(), np.abs(amortization).max()) < ZERO_GAP:
        return None
    figure = Figure(figsize=(max(4, 0.35 * len(obs) + 2), 3.5))
    ax = figure.subplots()
    position = np.arange(len(obs))
    ax.bar(position, approximation, color="tab:blue", label="approximation gap")
    ax.bar(position, amortization, bottom=approximation, color="tab:orange",
           label="amortization gap")
    ax.set_xticks(position, [str(n) for n in obs], fontsize="small")
    ax.set_xlabel("data point")
    ax.set_ylabel("nats")
    ax.set_title("log p(x) - ELBO" + ("" if gaps.exact else " (log p(x) importance-sampled)"))
    ax.legend()
    return plots.save_figure(figure, path)


def omitted_figures(summary: dict[str, float | int | None]) -> list[str]:
    """Sentences for the report about figures left out because they would be empty."""
    gaps = [summary.get(name) for name in ("approximation_gap", "amortization_gap")]
    if all(gap is not None and abs(gap) < ZERO_GAP for gap in gaps):
        return ["No gaps figure: log p(x) - ELBO is 0 at every point, because q(z|x) is the "
                "exact posterior."]
    return []


def draw_figures(diagnostics: Diagnostics, folder: Path, *, quiet: bool = False) -> list[Path]:
    """Every diagnostics figure that applies, into ``folder``, in the order of ``FIGURES``,
    with a progress bar unless ``quiet``."""
    idata, obs = diagnostics.idata, diagnostics.idata.observed_data.obs.values
    marginals, pair, forest, khat, sbc, gaps = (folder / f"{name}.png" for name in FIGURES)
    draws = [partial(plot_marginals, idata, marginals), partial(plot_pairs, idata, pair)]
    if "latent" in idata.posterior.dims:
        draws.append(partial(plot_forest, idata, forest))
    if diagnostics.importance is not None:
        draws.append(partial(plot_khat, diagnostics.importance.khat,
                             diagnostics.importance.exact, obs, khat))
    if diagnostics.calibration is not None:
        draws.append(partial(plot_ranks, diagnostics.calibration, sbc))
    if diagnostics.gaps is not None:
        draws.append(partial(plot_gaps, diagnostics.gaps, obs, gaps))
    figures = []
    with progress_bar(len(draws), "diagnostics figures", quiet=quiet, unit="figure") as bar:
        for draw_one in draws:
            figures.append(draw_one())
            bar.update()
    return [figure for figure in figures if figure is not None]

