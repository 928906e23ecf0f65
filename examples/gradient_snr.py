"""Gradient signal-to-noise of the importance-weighted objectives as the particles grow.

Rainforth et al. (2018, "Tighter variational bounds are not necessarily better") showed that
for the IWAE bound L_K the signal-to-noise ratio SNR = |E[g]| / sd(g) of the encoder's gradient
falls like 1 / sqrt(K) while the decoder's rises like sqrt(K): a tighter bound trains the
model better and the inference network worse. Their MIWAE, CIWAE and PIWAE, and the doubly
reparameterized DReG of Tucker et al. (2018), keep the encoder's SNR up.

This example reproduces the finding. For each model (PPCA on synthetic data; the VAE on
digits, or on MNIST when ``--data-dir`` or ``$ZOO_DATA`` holds it) it first trains model and
guide briefly with the ELBO, then, at those parameters, estimates each objective's gradient
``--repeats`` times on one minibatch for P total particles in {1, 4, 16, 64} and reports the
mean SNR over the encoder's and the decoder's parameters:

- ``iwae``   K = P;                      ``miwae``  M = K = sqrt(P);
- ``ciwae``  K = P, beta = 1/2;          ``piwae``  M = K = sqrt(P) (PIWAE(8, 8) at P = 64);
- ``dreg``   K = P;                      ``elbo``   P draws (MIWAE with K = 1), for reference.

Run it with

    python examples/gradient_snr.py [--models ppca vae] [--repeats R] [--out DIR]

The table goes to stdout and, as ``gradient_snr.md`` and ``gradient_snr.json``, to
``--results`` (default ``benchmarks/results``); ``snr_<model>.png`` (SNR against P, log-log,
one panel per parameter group) to ``--out``.

The SNRs are measured early in training (``--pretrain-steps``), where the expected gradients
are far from zero; at an optimum of the ELBO the expected ELBO gradient vanishes, and with it
every objective's SNR at K = 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from zoo.experiment import build_experiment, make_config
from zoo.objectives import gradient_snr, make_objective
from zoo.plots import save_figure
from zoo.train import fit, seed_everything

TOTAL_PARTICLES = (1, 4, 16, 64)
OBJECTIVES = ("iwae", "miwae", "ciwae", "piwae", "dreg", "elbo")
PRETRAIN_STEPS = {"ppca": 150, "vae": 1000}


def objective_options(name: str, total: int) -> dict[str, Any]:
    """The options of objective ``name`` with ``total`` particles per data point."""
    groups = math.isqrt(total)
    return {"iwae": {}, "dreg": {}, "ciwae": {"beta": 0.5},
            "miwae": {"num_groups": groups}, "piwae": {"num_groups": groups},
            "elbo": {}}[name] | {"num_particles": total}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ppca", "vae"], choices=["ppca", "vae"])
    parser.add_argument("--particles", type=int, nargs="+", default=list(TOTAL_PARTICLES),
                        metavar="P", help="totals of particles; perfect squares (M = K) (default: "
                             + " ".join(map(str, TOTAL_PARTICLES)) + ")")
    parser.add_argument("--repeats", type=int, default=100,
                        help="gradient estimates per objective and P (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="the one minibatch the gradients are taken on")
    parser.add_argument("--pretrain-steps", type=int, default=None,
                        help="ELBO steps before measuring (default: "
                             + ", ".join(f"{steps} for {model}"
                                         for model, steps in PRETRAIN_STEPS.items()) + ")")
    parser.add_argument("--data-dir", default=os.environ.get("ZOO_DATA"), metavar="DIR",
                        help="folder holding MNIST/raw; the VAE uses MNIST when it is there")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/gradient-snr", metavar="DIR",
                        help="folder of the figures (default: %(default)s)")
    parser.add_argument("--results", default="benchmarks/results", metavar="DIR",
                        help="folder of gradient_snr.md and .json (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _dataset(model: str, data_dir: str | None) -> dict[str, Any]:
    if model == "ppca":
        return {"name": "synthetic-ppca"}
    if data_dir and (Path(data_dir) / "MNIST" / "raw").is_dir():
        return {"name": "mnist", "data_dir": data_dir}
    return {"name": "digits"}


def measure(model_name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train ``model_name`` with the ELBO, then the SNR table {objective: {P: summary}}."""
    train = {"seed": args.seed, "steps": args.pretrain_steps or PRETRAIN_STEPS[model_name]}
    config = make_config(model_name, data=_dataset(model_name, args.data_dir), train=train)
    experiment = build_experiment(config, quiet=args.quiet)
    fit(experiment.model, experiment.guide, experiment.objective, experiment.train_inputs,
        settings=experiment.settings, transform=experiment.train_transform)
    batch = tuple(tensor[:args.batch_size] for tensor in experiment.inputs("train"))
    table: dict[str, dict[int, dict[str, float]]] = {}
    for name in OBJECTIVES:
        table[name] = {}
        for total in args.particles:
            seed_everything(args.seed)
            objective = make_objective(name, **objective_options(name, total))
            snr = gradient_snr(experiment.model, experiment.guide, objective, batch,
                               repeats=args.repeats)
            table[name][total] = snr.summary()
    return {"data": config["data"]["name"], "snr": table}


def plot_snr(model_name: str, result: dict[str, Any], path: Path) -> Path:
    figure = Figure(figsize=(10, 4), layout="constrained")
    for axes, group in zip(figure.subplots(1, 2), ("encoder", "decoder"), strict=True):
        for name, by_total in result["snr"].items():
            totals = sorted(by_total)
            axes.plot(totals, [by_total[p][f"{group}_snr_mean"] for p in totals], marker="o",
                      label=name, linestyle="--" if name == "elbo" else "-")
        axes.set(xscale="log", yscale="log", xlabel="particles per data point, P",
                 ylabel="mean SNR over parameters",
                 title=f"{model_name} ({result['data']}): {group} gradient")
        axes.set_xticks(sorted(next(iter(result["snr"].values()))), minor=False)
        axes.set_xticklabels([str(p) for p in sorted(next(iter(result["snr"].values())))])
        axes.grid(True, which="both", alpha=0.3)
    figure.axes[0].legend()
    return save_figure(figure, path)


def main(args: argparse.Namespace) -> dict[str, Any]:
    if any(math.isqrt(p) ** 2 != p for p in args.particles):
        raise SystemExit("--particles must be perfect squares (MIWAE and PIWAE use M = K)")
    out = Path(args.out)
    results: dict[str, Any] = {}
    for model_name in args.models:
        results[model_name] = measure(model_name, args)
        results[model_name]["figure"] = str(plot_snr(model_name, results[model_name],
                                                     out / f"snr_{model_name}.png"))
    table = markdown_table(results, args)
    print(table)
    folder = Path(args.results)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gradient_snr.md").write_text(table)
    (folder / "gradient_snr.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def markdown_table(results: dict[str, Any], args: argparse.Namespace) -> str:
    """One table per model: encoder and decoder SNR of each objective, P along a row."""
    totals = " / ".join(map(str, args.particles))
    lines = [f"Mean gradient SNR over {args.repeats} estimates, seed {args.seed} "
             f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})"]
    for model_name, result in results.items():
        lines += ["", f"{model_name} on {result['data']}:", "",
                  f"| objective | encoder SNR, P = {totals} | decoder SNR, P = {totals} |",
                  "|---|---|---|"]
        for name, by_total in result["snr"].items():
            cells = [" / ".join(f"{by_total[p][f'{group}_snr_mean']:.2f}"
                                for p in args.particles) for group in ("encoder", "decoder")]
            lines.append(f"| `{name}` | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(build_parser().parse_args())
