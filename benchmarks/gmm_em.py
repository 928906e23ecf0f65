"""The Gaussian mixture trained by SVI with its default settings, against scikit-learn's EM.

For each data set (the zoo's ``synthetic-gmm``, and scikit-learn's iris and wine written as CSV
tables and standardized, as a user would pass them with ``--data FILE --standardize``) this
fits scikit-learn's ``GaussianMixture`` (best of ten k-means initializations, float64) and
trains ``zoo train gmm`` three ways with everything else at its defaults:

- ``enumerate``: the assignments summed out (``--guide enumerate``, the default), with
  ``--covariance full`` and ``diag``;
- ``amortized``: q(z | x) with its exact ELBO (``--guide amortized``, its default loss);
- ``amortized --loss tracegraph``: the same guide by the score function.

It reports, per training point, each fit's exact log-likelihood minus EM's (negative: EM is
higher) and minus the enumerate fit's, the amortized guides' mean KL to the exact
responsibilities, and the seconds each took (one thread, with the machine's load average).

    python benchmarks/gmm_em.py [--datasets synthetic-gmm iris wine] [--out benchmarks/results]

writes ``gmm_em.json`` and ``gmm_em.md`` to the output folder.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_iris, load_wine
from sklearn.mixture import GaussianMixture

from zoo.evaluate import evaluate
from zoo.experiment import build_experiment, make_config
from zoo.train import fit

TABLES = {"iris": load_iris, "wine": load_wine}
"""scikit-learn's tables, written to CSV and passed with --standardize."""

FITS = {  # name -> (guide, covariance, objective or None for the guide's default)
    "enumerate, full": ("enumerate", "full", None),
    "enumerate, diag": ("enumerate", "diag", None),
    "amortized, full": ("amortized", "full", None),
    "amortized --loss tracegraph, full": ("amortized", "full", "tracegraph"),
}


def data_config(name: str, folder: Path) -> dict[str, Any]:
    """The ``data`` section for a named data set, or for a scikit-learn table as a CSV file."""
    if name not in TABLES:
        return {"name": name}
    x = TABLES[name]().data
    path = folder / f"{name}.csv"
    np.savetxt(path, x, delimiter=",", comments="",
               header=",".join(f"x{d}" for d in range(x.shape[1])))
    return {"file": str(path), "standardize": True}


def run_fit(data: dict[str, Any], guide: str, covariance: str, loss: str | None
            ) -> dict[str, Any]:
    """Train one SVI fit with the registry's defaults; its exact metrics on the training rows."""
    config = make_config("gmm", guide=guide, options={"covariance": covariance}, data=data,
                         objective={"name": loss} if loss else None)
    started = time.perf_counter()
    experiment = build_experiment(config, quiet=True)
    fit(experiment.model, experiment.guide, experiment.objective, experiment.train_inputs,
        settings=experiment.settings)
    seconds = time.perf_counter() - started
    x = experiment.data.x_train
    with torch.no_grad():
        metrics = evaluate(experiment.model, experiment.guide, x, num_samples=1)
    return {"log_likelihood": metrics["exact_log_likelihood"],
            "responsibility_kl": metrics.get("responsibility_kl"), "seconds": seconds, "x": x,
            "components": experiment.config["options"]["components"]}


def run_em(x: torch.Tensor, components: int, covariance: str) -> float:
    """EM's training log-likelihood per point, best of ten k-means starts."""
    em = GaussianMixture(components, covariance_type=covariance, n_init=10, random_state=0)
    rows = x.double().numpy()
    return float(em.fit(rows).score(rows))


def main(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as temporary:
        for name in args.datasets:
            data = data_config(name, Path(temporary))
            fits = {fit_name: run_fit(data, *spec) for fit_name, spec in FITS.items()}
            x, components = fits["enumerate, full"]["x"], fits["enumerate, full"]["components"]
            em = {covariance: run_em(x, components, covariance) for covariance in ("full", "diag")}
            for fit_name, result in fits.items():
                covariance = FITS[fit_name][1]
                enumerate_ll = fits[f"enumerate, {covariance}"]["log_likelihood"]
                result = {key: value for key, value in result.items()
                          if key not in ("x", "components")}
                row = {"data": name, "fit": fit_name, **result,
                       "gap_to_em": em[covariance] - result["log_likelihood"],
                       "gap_to_enumerate": enumerate_ll - result["log_likelihood"]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "load_before": load_before, "load_after": os.getloadavg(),
              "cpus": os.cpu_count(), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gmm_em.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"GMM defaults against EM ({result['date']}; one thread; load average "
             f"{load_before[0]:.1f} before, {result['load_after'][0]:.1f} after, "
             f"{result['cpus']} CPUs)", "",
             "| data | fit | gap to EM | gap to enumerate | KL to the responsibilities | s |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        kl = "" if row["responsibility_kl"] is None else f"{row['responsibility_kl']:.4f}"
        lines.append(f"| {row['data']} | {row['fit']} | {row['gap_to_em']:.4f} | "
                     f"{row['gap_to_enumerate']:.4f} | {kl} | {row['seconds']:.0f} |")
    (out / "gmm_em.md").write_text("\n".join(lines) + "\n")
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["synthetic-gmm", "iris", "wine"],
                        choices=["synthetic-gmm", *TABLES])
    parser.add_argument("--out", default="benchmarks/results", metavar="DIR")
    return parser


if __name__ == "__main__":
    main(build_parser().parse_args())
