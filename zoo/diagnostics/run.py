"""``zoo diagnose RUN``: the diagnostics of a trained run, written into its folder as
``diagnostics.nc``, ``summary.csv``, the figures and ``report.html``."""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from zoo import runs
from zoo.diagnostics.diagnose import Diagnostics, diagnose
from zoo.diagnostics.figures import draw_figures, omitted_figures
from zoo.diagnostics.settings import DiagnosticSettings
from zoo.errors import ZooError
from zoo.experiment import load_run
from zoo.report import Section, write_report
from zoo.train import seed_everything

NETCDF = "diagnostics.nc"
SUMMARY = "summary.csv"
DIAGNOSTIC_PLOTS = ("posterior-fit",)
"""Plot kinds of a registry entry (``ModelEntry.plots``) that :func:`diagnose_run` draws too."""


def write_summary(per_point: dict[str, Tensor], obs: np.ndarray, path: Path) -> Path:
    """One row per data point, one column per metric (empty where it does not apply)."""
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["obs", *per_point])
        for row, n in enumerate(obs):
            values = [per_point[name][row].item() for name in per_point]
            writer.writerow([int(n), *("" if math.isnan(value) else repr(value)
                                       for value in values)])
    return path


NOTES = (
    "KL, mean and sd errors and the Wasserstein distance compare q(z|x) with the reference "
    "posterior per point (means over points here; per point in summary.csv).",
    "PSIS k-hat < 0.5: q is a good importance proposal for p; 0.5-0.7 usable; > 0.7 unreliable "
    "(q misses posterior mass). Points whose weights are all equal have an exact q; points "
    "with fewer than five weights above the tail's cutoff have no fitted tail (khat_unfitted) "
    "and are left out of khat_max and khat_mean. k-hat measures the shape of the weights' "
    "tail, not its size, so read it with the ESS.",
    "SBC: the p-value of a chi-square test that the ranks of prior draws among guide draws are "
    "uniform (Bonferroni over latent dimensions); small values mean q is miscalibrated.",
    "log p(x) - ELBO = approximation gap (best member of the family for that x) + amortization "
    "gap (the cost of one shared encoder).",
)


def diagnose_run(run_dir: str | os.PathLike, *, num_points: int = 20,
                 settings: DiagnosticSettings = DiagnosticSettings(), quiet: bool = False
                 ) -> dict[str, float | int | None]:
    """Diagnose a trained run on its first ``num_points`` test points (training points without
    a test split) and write ``diagnostics.nc``, ``summary.csv``, the figures and ``report.html``
    into the run folder. Returns the aggregate summary (see :class:`Diagnostics`). ``quiet``
    hides the progress bars."""
    if num_points < 1:
        raise ZooError(f"--points must be at least 1; got {num_points}")
    started = time.perf_counter()
    run_dir = Path(run_dir)
    experiment = load_run(run_dir)
    seed_everything(experiment.settings.seed)
    experiment.model.eval(), experiment.guide.eval()
    split = "test" if experiment.inputs("test") is not None else "train"
    inputs = tuple(tensor[:num_points] for tensor in experiment.inputs(split))
    diagnostics = diagnose(experiment.model, experiment.guide, *inputs,
                           settings=dataclasses.replace(settings, quiet=quiet))

    diagnostics.idata.to_netcdf(str(run_dir / NETCDF))
    obs = diagnostics.idata.observed_data.obs.values
    write_summary(diagnostics.per_point, obs, run_dir / SUMMARY)
    folder = run_dir / runs.FIGURES
    figures = draw_figures(diagnostics, folder, quiet=quiet)
    with torch.no_grad():
        figures += [experiment.entry.plots[kind](experiment, folder / f"{kind}.png")
                    for kind in DIAGNOSTIC_PLOTS if kind in experiment.entry.plots]
    seconds = time.perf_counter() - started
    config = experiment.config
    write_report(run_dir, f"zoo diagnose: {run_dir.name}", [Section(
        title=f"diagnostics: {config['model']} with the {config['guide']} guide",
        description=f"q(z|x) against the {diagnostics.idata.reference_posterior.attrs['method']} "
                    f"posterior on {len(obs)} {split} points",
        metrics={f"mean over {len(obs)} {split} points": {
            name: value for name, value in diagnostics.summary.items() if value is not None}},
        totals={"ess_mean": diagnostics.summary["num_draws"]} if "num_draws" in diagnostics.summary
        else {},
        figures=figures, notes=[*NOTES, *_run_notes(diagnostics),
                                *omitted_figures(diagnostics.summary),
                                f"{seconds:.1f} s; draws and per-point metrics in {NETCDF} "
                                f"and {SUMMARY}."])])
    return diagnostics.summary


def _run_notes(diagnostics: Diagnostics) -> list[str]:
    """How the reference and log p(x) were obtained, for the report."""
    reference = diagnostics.idata.reference_posterior
    notes = []
    if reference.attrs["method"] == "NUTS":
        notes.append(f"Reference: NUTS on the first {reference.sizes['obs']} points, "
                     f"{reference.sizes['chain']} chains of {reference.sizes['draw']} draws, "
                     f"{reference.attrs['divergences']:.0f} divergences, mean acceptance "
                     f"{reference.attrs['acceptance']:.2f}.")
    if diagnostics.gaps is not None and not diagnostics.gaps.exact:
        notes.append("log p(x) is importance-sampled (the larger of the estimates with q and "
                     "q* as proposals); importance sampling underestimates log p(x) on average, "
                     "so the approximation gap tends to be underestimated.")
    infinite = [name for name, value in diagnostics.summary.items() if value is None]
    if infinite:
        notes.append(f"Not finite, so left out of the table: {', '.join(infinite)}.")
    return notes

