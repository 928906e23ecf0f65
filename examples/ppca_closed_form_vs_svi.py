"""Probabilistic PCA: stochastic variational inference against the closed form.

Probabilistic PCA has a closed-form maximum-likelihood solution (Tipping & Bishop, 1999), so
SVI can be checked against the exact answer. This example fits PPCA by SVI twice, once with
each amortized guide (``meanfield``: diagonal q(z|x); ``full``: full-covariance q(z|x), a family
that contains the exact posterior), and compares each fit with the closed form:

- the exact log-likelihood per data point (train and test) and its gap to the closed form;
- the noise scale sigma;
- the largest principal angle between the column spaces of W_svi and W_mle (W is identified
  only up to a rotation, so its column space is what can be compared);
- the mean KL(q(z|x) || p(z|x)) between each guide and the model's exact posterior.

While training, it records the ELBO and the exact log-likelihood at the current parameters,
so ``ppca_training.png`` shows the ELBO climbing towards the exact log-likelihood, which in turn
climbs towards the closed-form optimum; with the mean-field guide a gap remains.
``posterior_<guide>.png`` draws exact and approximate posteriors of six training points over
the first two latent dimensions (when there are at least two).

Run it with

    python examples/ppca_closed_form_vs_svi.py [--steps N] [--out DIR]

(``--help`` lists every option); the table goes to stdout and the figures to DIR.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from zoo import plots
from zoo.evaluate import evaluate
from zoo.experiment import Experiment, build_experiment, make_config
from zoo.train import fit, seed_everything

GUIDES = ("meanfield", "full")
NUM_POSTERIOR_POINTS = 6
NUM_SAMPLES = 100  # importance samples for evaluate(); only its exact metrics are reported


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="synthetic-ppca", help="named data set")
    parser.add_argument("--data", metavar="FILE",
                        help="your own table (.csv with a header, or .npy) instead of --dataset")
    parser.add_argument("--latent-dim", type=int, default=2, metavar="M")
    parser.add_argument("--steps", type=int,
                        help="a fixed budget of optimizer steps per guide (default: train to "
                             "convergence, as zoo train ppca does)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/ppca-closed-form-vs-svi", metavar="DIR",
                        help="folder for the figures (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def principal_angles(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The principal angles, in degrees and ascending, between the column spaces of
    ``A: [D, M]`` and ``B: [D, M]`` (both of full column rank).

    With orthonormal bases Q_A and Q_B of the two spaces (QR decompositions), the singular
    values of Q_A^T Q_B are the cosines of the angles (descending, so the angles ascend).
    Shape ``[M]``, float64; all zero when the spaces agree.
    """
    Q_A, _ = torch.linalg.qr(A.double())
    Q_B, _ = torch.linalg.qr(B.double())
    cosines = torch.linalg.svdvals(Q_A.T @ Q_B).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.arccos(cosines))


def _train(experiment: Experiment) -> tuple[list[dict[str, float]], float]:
    """Train and return the curve (per epoch: step, ELBO, exact log-likelihood, both per
    training point) and the seconds spent in training steps."""
    model, x = experiment.model, experiment.data.x_train
    curve = []

    def record(row: dict[str, float]) -> None:
        with torch.no_grad():
            exact = model.marginal_log_prob(x).mean().item()
        curve.append({"step": row["step"], "elbo": -row["train_loss"], "exact": exact})

    history = fit(model, experiment.guide, experiment.objective, experiment.train_inputs,
                  settings=experiment.settings, on_epoch=record)
    return curve, sum(row["seconds"] for row in history)


def _plot_training(curves: dict[str, list[dict[str, float]]], optimum: float,
                   path: Path) -> Path:
    """ELBO (solid; the epoch's mean over its minibatches, hence noisy) and exact
    log-likelihood (dashed) of each guide over training, with the closed-form optimum; the
    right panel zooms into the second half of training."""
    figure = Figure(figsize=(11, 4), layout="constrained")
    panels = figure.subplots(1, 2)
    for axes, start, title in ((panels[0], 0.1, "training (after the first 10%)"),
                               (panels[1], 0.5, "second half, zoomed")):
        shown = []
        for (guide, curve), color in zip(curves.items(), ("tab:red", "tab:blue"), strict=True):
            rows = [row for row in curve if row["step"] >= start * curve[-1]["step"]]
            steps = [row["step"] for row in rows]
            for key, style, label in (("elbo", "-", "ELBO"), ("exact", "--", "exact log p(x)")):
                values = [row[key] for row in rows]
                axes.plot(steps, values, style, color=color, label=f"{guide}: {label}")
                shown += values
        axes.axhline(optimum, color="black", linewidth=1, label="closed-form optimum")
        low, high = min(shown), max(*shown, optimum)
        pad = 0.05 * (high - low) or 0.01
        axes.set_ylim(low - pad, high + pad)
        axes.set_xlabel("step")
        axes.set_ylabel("nats per training point")
        axes.set_title(title)
        axes.grid(alpha=0.3)
    panels[1].legend(loc="lower right", fontsize="small")
    return plots.save_figure(figure, path)


def main(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    data = {"name": None if args.data else args.dataset, "file": args.data}
    results: dict[str, Any] = {}
    curves: dict[str, list[dict[str, float]]] = {}
    figures: list[Path] = []
    for guide_name in GUIDES:
        config = make_config("ppca", guide=guide_name, options={"latent_dim": args.latent_dim},
                             data=data, train={"steps": args.steps, "seed": args.seed})
        experiment = build_experiment(config, quiet=args.quiet)
        curves[guide_name], seconds = _train(experiment)
        model, guide = experiment.model, experiment.guide
        x_train, x_test = experiment.data.x_train, experiment.data.x_test
        seed_everything(args.seed)
        train = evaluate(model, guide, x_train, num_samples=NUM_SAMPLES, train_x=x_train)
        test = evaluate(model, guide, x_test, num_samples=NUM_SAMPLES, train_x=x_train)
        with torch.no_grad():
            mle = model.maximum_likelihood(x_train)
            angles = principal_angles(model.W, mle.W)
            if args.latent_dim >= 2:  # the ellipses are drawn over z1 and z2
                points = x_train[:NUM_POSTERIOR_POINTS]
                figures.append(plots.plot_posterior_ellipses(
                    model.posterior(points), guide.distribution(points),
                    out / f"posterior_{guide_name}.png",
                    title=f"PPCA after SVI: exact posterior vs {guide_name} guide"))
        results[guide_name] = {
            "log_likelihood_train": train["exact_log_likelihood"],
            "log_likelihood_test": test["exact_log_likelihood"],
            "gap_train": train["mle_log_likelihood"] - train["exact_log_likelihood"],
            "gap_test": test["mle_log_likelihood"] - test["exact_log_likelihood"],
            "elbo_train": train["elbo"],
            "sigma": model.sigma.item(),
            "max_angle_degrees": angles.max().item(),
            "posterior_kl": train["posterior_kl"],
            "seconds": seconds,
        }
        results["closed_form"] = {  # the same for both guides: same data, same split
            "log_likelihood_train": train["mle_log_likelihood"],
            "log_likelihood_test": test["mle_log_likelihood"],
            "sigma": mle.sigma.item(),
        }
    figures.append(_plot_training(curves, results["closed_form"]["log_likelihood_train"],
                                  out / "ppca_training.png"))
    _print_table(results)
    results["figures"] = [str(path) for path in figures]
    return results


def _print_table(results: dict[str, Any]) -> None:
    """One row per fit; log-likelihoods and gaps in nats per data point."""
    header = (f"{'fit':<12}{'loglik train':>13}{'loglik test':>13}{'gap train':>11}"
              f"{'gap test':>10}{'sigma':>8}{'angle(deg)':>12}{'KL(q||p)':>10}{'seconds':>9}")
    print(header)
    print("-" * len(header))
    closed = results["closed_form"]
    print(f"{'closed form':<12}{closed['log_likelihood_train']:>13.4f}"
          f"{closed['log_likelihood_test']:>13.4f}{'':>11}{'':>10}{closed['sigma']:>8.4f}")
    for name in GUIDES:
        row = results[name]
        print(f"{'SVI ' + name:<12}{row['log_likelihood_train']:>13.4f}"
              f"{row['log_likelihood_test']:>13.4f}{row['gap_train']:>11.4f}"
              f"{row['gap_test']:>10.4f}{row['sigma']:>8.4f}{row['max_angle_degrees']:>12.3f}"
              f"{row['posterior_kl']:>10.4f}{row['seconds']:>9.1f}")
    print("gap = closed-form log-likelihood minus SVI's (>= 0 on train); angle = largest "
          "principal angle between the column spaces of W_svi and W_mle")


if __name__ == "__main__":
    main(build_parser().parse_args())
