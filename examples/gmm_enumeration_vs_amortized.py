"""Gaussian mixture: exact enumeration, an amortized guide, and EM on the same data.

A Gaussian mixture's assignments z_n are discrete, so there are two ways to train it by SVI:
sum z out exactly (Pyro's ``TraceEnum_ELBO`` with z marked for enumeration: the loss is then
-log p(x) and the mixture's parameters are maximum-likelihood point estimates), or learn an
amortized guide q(z | x) = Categorical(encoder(x)). The amortized guide can be trained with the
ELBO's exact expectation over its K values (enumerating q: ``--loss enum``) or, as one would
for a latent variable too large to enumerate, with one draw of z per row and the score-function
gradient (``TraceGraph_ELBO`` with the guide's learned baseline: ``--loss tracegraph``, the
registry's default for this guide). This example runs all three SVI fits (``ROUTES``) with the
registry's default settings, and scikit-learn's EM (``GaussianMixture``, best of ten
k-means initializations) on the same training rows, and reports:

- the exact log-likelihood per data point (train and test) of each fit and its gap to EM, the
  ELBO, and the mean KL(q(z|x) || p(z|x)) of the amortized guides;
- the seconds each fit took (initialization with its restarts, training) and the seconds after
  which its training log-likelihood stayed within 0.01 nats of EM's, against EM's own time;
- the variance of the three gradient estimators (enumeration; amortized, exact; amortized,
  score function) at the same parameters: its total over the mixture's parameters and over the
  encoder's, across random minibatches, and at one fixed minibatch where only the draws of z
  vary.

``gmm_comparison.png`` shows the data coloured by responsibilities with every fit's component
ellipses (in the plane of the first two principal components when D > 2), and the ELBO and
exact log-likelihood of each SVI fit over its training, with EM's log-likelihood as reference.

Run it with

    python examples/gmm_enumeration_vs_amortized.py [--steps N] [--out DIR]

(``--help`` lists every option); the tables go to stdout and the figure to DIR.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from scipy.optimize import linear_sum_assignment
from sklearn.mixture import GaussianMixture

from zoo import plots
from zoo.contract import DISCRETE_POSTERIOR, offers
from zoo.data import load_data
from zoo.evaluate import discrete_metrics
from zoo.experiment import Experiment, build_experiment, make_config
from zoo.figures import gmm as figures
from zoo.guides.gmm import EnumerateGuide
from zoo.objectives import make_objective
from zoo.registry import get_model
from zoo.train import fit, seed_everything

ROUTES = {  # route -> (guide, objective): z summed out; q(z | x) exact ELBO; q by one draw
    "enumerate": ("enumerate", "enum"),
    "amortized": ("amortized", "enum"),
    "score_function": ("amortized", "tracegraph"),
}
LABELS = {"em": "EM (sklearn)", "enumerate": "SVI enumerate", "amortized": "SVI amortized",
          "score_function": "SVI score-fn"}
TOLERANCE = 0.01  # nats per data point: "reached EM"


def build_parser() -> argparse.ArgumentParser:
    entry = get_model("gmm")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="synthetic-gmm", help="named data set")
    parser.add_argument("--data", metavar="FILE",
                        help="your own table (.csv with a header, or .npy) instead of --dataset")
    parser.add_argument("--standardize", action="store_true",
                        help="shift and scale each column to mean 0, sd 1 (fitted on train)")
    parser.add_argument("--components", type=int, default=entry.options["components"],
                        metavar="K")
    parser.add_argument("--covariance", default=entry.options["covariance"],
                        help="full or diag (default: %(default)s)")
    parser.add_argument("--restarts", type=int, default=entry.options["restarts"], metavar="R",
                        help="candidate initializations of each SVI fit (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=entry.train["steps"],
                        help="optimizer steps per SVI fit (default: %(default)s)")
    parser.add_argument("--variance-repeats", type=int, default=100, metavar="S",
                        help="gradient estimates per estimator for the variances "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/gmm-enumeration-vs-amortized", metavar="DIR",
                        help="folder for the figure (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _config(args: argparse.Namespace, route: str) -> dict[str, Any]:
    guide, objective = ROUTES[route]
    return make_config(
        "gmm", guide=guide,
        options={"components": args.components, "covariance": args.covariance,
                 "restarts": args.restarts},
        data={"name": None if args.data else args.dataset, "file": args.data,
              "standardize": args.standardize},
        objective={"name": objective},
        train={"steps": args.steps, "seed": args.seed})


def run_em(x_train: torch.Tensor, x_test: torch.Tensor | None, args: argparse.Namespace
           ) -> dict[str, Any]:
    """scikit-learn's EM, best of ten k-means initializations, timed; float64."""
    started = time.perf_counter()
    em = GaussianMixture(args.components, covariance_type=args.covariance, n_init=10,
                         random_state=args.seed).fit(x_train.double().numpy())
    seconds = time.perf_counter() - started
    covariances = torch.from_numpy(em.covariances_)
    if args.covariance == "diag":
        covariances = torch.diag_embed(covariances)
    return {
        "log_likelihood_train": em.score(x_train.double().numpy()),
        "log_likelihood_test": None if x_test is None else em.score(x_test.double().numpy()),
        "seconds": seconds, "seconds_to_em": seconds,
        "weights": torch.from_numpy(em.weights_), "means": torch.from_numpy(em.means_),
        "covariances": covariances,
        "responsibilities": torch.from_numpy(em.predict_proba(x_train.double().numpy())),
    }


def run_route(route: str, args: argparse.Namespace, em_log_likelihood: float
              ) -> tuple[dict[str, Any], Experiment]:
    """Build (with the restarts) and train one SVI fit with the route's guide and objective;
    record its curve per epoch."""
    started = time.perf_counter()
    experiment = build_experiment(_config(args, route), quiet=args.quiet)
    init_seconds = time.perf_counter() - started
    model, guide, x = experiment.model, experiment.guide, experiment.data.x_train
    curve = [{"step": 0, "seconds": init_seconds, "elbo": None,
              "exact": model.marginal_log_prob(x).mean().item()}]

    def record(row: dict[str, float]) -> None:
        with torch.no_grad():
            exact = model.marginal_log_prob(x).mean().item()
        curve.append({"step": row["step"], "seconds": curve[-1]["seconds"] + row["seconds"],
                      "elbo": -row["train_loss"], "exact": exact})

    fit(model, guide, experiment.objective, experiment.train_inputs,
        settings=experiment.settings, on_epoch=record)
    within = [row["exact"] >= em_log_likelihood - TOLERANCE for row in curve]
    settled = next((i for i in range(len(curve)) if all(within[i:])), None)
    with torch.no_grad():
        train = {**discrete_metrics(model, guide, x), "bic": model.bic(x)}
        test = (None if experiment.data.x_test is None
                else discrete_metrics(model, guide, experiment.data.x_test))
    return {
        "objective": experiment.config["objective"]["name"],
        "log_likelihood_train": train["log_likelihood"],
        "log_likelihood_test": None if test is None else test["log_likelihood"],
        "elbo_train": train["elbo"], "responsibility_kl": train.get("responsibility_kl"),
        "bic_train": train["bic"], "seconds_init": init_seconds,
        "seconds": curve[-1]["seconds"],
        "seconds_to_em": None if settled is None else curve[settled]["seconds"],
        "curve": curve,
    }, experiment


def gradient_variance(experiment: Experiment, repeats: int, batch_size: int, seed: int
                      ) -> dict[str, dict[str, float]]:
    """Total variance (the trace of the covariance) of the gradient of the loss per data point,
    over ``repeats`` estimates, for the mixture's parameters (``model``) and the encoder's
    (``encoder``), at the experiment's current parameters.

    Estimators, one per route of ``ROUTES``: ``enumerate`` (z summed out, no guide), ``amortized``
    (``enum`` sums the guide's K values: the exact ELBO gradient) and ``score_function``
    (``tracegraph``, one draw of z per row, with the guide's baseline); each on ``random``
    minibatches of ``batch_size`` rows and on one ``fixed`` minibatch, where only the draws
    vary.
    """
    model, guide, x = experiment.model, experiment.guide, experiment.data.x_train
    guides = {"enumerate": EnumerateGuide(model.data_dim, model.components), "amortized": guide}
    groups = {"model": list(model.parameters()), "encoder": list(guide.encoder.parameters())}
    estimators = {route: (make_objective(objective), guides[guide_name])
                  for route, (guide_name, objective) in ROUTES.items()}
    generator = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, x.shape[0])
    fixed = torch.randperm(x.shape[0], generator=generator)[:batch_size]
    result = {}
    for name, (objective, estimator_guide) in estimators.items():
        for batches in ("random", "fixed"):
            draws = {group: [] for group in groups}
            seed_everything(seed)
            for _ in range(repeats):
                rows = (fixed if batches == "fixed" else
                        torch.randperm(x.shape[0], generator=generator)[:batch_size])
                for parameter in (*model.parameters(), *guide.parameters()):
                    parameter.grad = None
                objective.differentiable_loss(model, estimator_guide, x[rows]).backward()
                for group, parameters in groups.items():
                    if all(p.grad is not None for p in parameters):
                        draws[group].append(torch.cat([p.grad.flatten() / batch_size
                                                       for p in parameters]))
            result[f"{name}/{batches}"] = {
                group: torch.stack(values).var(0).sum().item() if values else None
                for group, values in draws.items()}
    for parameter in (*model.parameters(), *guide.parameters()):
        parameter.grad = None
    return result


def matching(reference: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """The order of the components ``means: [K, D]`` that best matches ``reference: [K, D]``
    (Hungarian matching of the Euclidean distances), so that matched components share a
    colour: the mixture is the same under any permutation of its components."""
    rows, columns = linear_sum_assignment(torch.cdist(reference.double(), means.double()).numpy())
    return torch.as_tensor(columns)[torch.as_tensor(rows).argsort()]


@torch.no_grad()
def _plot(results: dict[str, Any], experiments: dict[str, Experiment], em: dict[str, Any],
          path: Path) -> Path:
    """Top: the data coloured by each fit's responsibilities (q for the amortized guides) with
    its component ellipses, components matched to the enumerated fit's; bottom: ELBO (solid)
    and exact log-likelihood (dashed) of the SVI fits over training seconds, with EM's
    log-likelihood."""
    x = next(iter(experiments.values())).data.x_train
    figure = Figure(figsize=(16, 8), layout="constrained")
    grid = figure.add_gridspec(2, 4)
    two_d = x.shape[1] >= 2
    plane = figures.principal_plane(x) if two_d else None
    panels = [("em", em["weights"], em["means"], em["covariances"], em["responsibilities"])]
    for route, experiment in experiments.items():
        model, guide = experiment.model, experiment.guide
        responsibilities = (guide.responsibilities(x) if offers(guide, DISCRETE_POSTERIOR)
                            else model.responsibilities(x))
        panels.append((route, model.weights, model.means, model.covariances, responsibilities))
    reference = experiments["enumerate"].model.means
    for column, (route, weights, means, covariances, responsibilities) in enumerate(panels):
        order = matching(reference, means)
        weights, means, covariances = weights[order], means[order], covariances[order]
        responsibilities = responsibilities[:, order]
        axes = figure.add_subplot(grid[0, column])
        gap = em["log_likelihood_train"] - results[route]["log_likelihood_train"]
        title = f"{LABELS[route]}: gap {gap:+.4f}" if route != "em" else LABELS[route]
        if two_d:
            figures.draw_components(axes, x, responsibilities, weights, means, covariances,
                                    plane=plane, title=title)
        else:
            figures.draw_densities(axes, x, weights, means, covariances, title=title)
    axes = figure.add_subplot(grid[1, :])
    shown = [em["log_likelihood_train"]]
    for (route, row), color in zip(((r, results[r]) for r in ROUTES),
                                   ("black", "tab:red", "tab:blue"), strict=True):
        curve = row["curve"]
        seconds = [point["seconds"] for point in curve[1:]]
        for key, style, label in (("elbo", "-", "ELBO"), ("exact", "--", "log p(x)")):
            values = [point[key] for point in curve[1:]]
            axes.plot(seconds, values, style, color=color, label=f"{LABELS[route]}: {label}")
            shown += values[len(values) // 5:]
    axes.axhline(em["log_likelihood_train"], color="tab:green", linewidth=1,
                 label=f"EM (sklearn), {em['seconds']:.2f} s")
    low, high = min(shown), max(shown)
    pad = 0.1 * (high - low) or 0.01
    axes.set_ylim(low - pad, high + pad)
    axes.set_xlabel("seconds (including initialization)")
    axes.set_ylabel("nats per training point")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize="small", ncol=2)
    return plots.save_figure(figure, path)


def main(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    data = load_data(**_config(args, "enumerate")["data"])
    build_experiment(_config(args, "enumerate"), quiet=True)  # warm-up: one-time costs untimed
    em = run_em(data.x_train, data.x_test, args)
    results: dict[str, Any] = {"em": em}
    experiments: dict[str, Experiment] = {}
    for route in ROUTES:
        results[route], experiments[route] = run_route(route, args, em["log_likelihood_train"])
    amortized = experiments["score_function"]
    variance = gradient_variance(amortized, args.variance_repeats,
                                 amortized.settings.batch_size, args.seed)
    figure = _plot(results, experiments, em, out / "gmm_comparison.png")
    _print_tables(results, variance)
    summary = {"em": {key: value for key, value in em.items()
                      if key in ("log_likelihood_train", "log_likelihood_test", "seconds")}}
    for route in ROUTES:
        summary[route] = {key: value for key, value in results[route].items() if key != "curve"}
        summary[route]["gap_train"] = (em["log_likelihood_train"]
                                       - results[route]["log_likelihood_train"])
    summary["gradient_variance"] = variance
    summary["figures"] = [str(figure)]
    return summary


def _number(value: float | None, width: int, digits: int = 4) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def _print_tables(results: dict[str, Any], variance: dict[str, dict[str, float]]) -> None:
    """The fits, the gradient variances, and the closing note."""
    em = results["em"]
    header = (f"{'fit':<16}{'loss':<12}{'loglik train':>13}{'loglik test':>13}{'gap to EM':>11}"
              f"{'ELBO train':>12}{'KL(q||p)':>10}{'init s':>8}{'total s':>9}{'to EM s':>9}")
    print(header)
    print("-" * len(header))
    print(f"{LABELS['em']:<16}{'':<12}{_number(em['log_likelihood_train'], 13)}"
          f"{_number(em['log_likelihood_test'], 13)}{'':>11}{'':>12}{'':>10}{'':>8}"
          f"{_number(em['seconds'], 9, 2)}{_number(em['seconds'], 9, 2)}")
    for route in ROUTES:
        row = results[route]
        print(f"{LABELS[route]:<16}{row['objective']:<12}"
              f"{_number(row['log_likelihood_train'], 13)}{_number(row['log_likelihood_test'], 13)}"
              f"{_number(em['log_likelihood_train'] - row['log_likelihood_train'], 11)}"
              f"{_number(row['elbo_train'], 12)}{_number(row['responsibility_kl'], 10)}"
              f"{_number(row['seconds_init'], 8, 2)}{_number(row['seconds'], 9, 2)}"
              f"{_number(row['seconds_to_em'], 9, 2)}")
    print(f"gap = EM's training log-likelihood minus the fit's; 'to EM s' = seconds after which "
          f"the fit's training log-likelihood stayed within {TOLERANCE} nats of EM's ('-': not "
          f"at the end)")
    print()
    print(f"{'gradient variance (trace)':<28}{'model':>12}{'encoder':>12}")
    for name, groups in variance.items():
        print(f"{name:<28}" + "".join("-".rjust(12) if groups[group] is None
                                      else f"{groups[group]:>12.3e}"
                                      for group in ("model", "encoder")))
    print("the trace of the covariance of the gradient of the loss per point at the "
          "score-function fit's final parameters; 'fixed' = one minibatch, only z's draws vary")
    ratio = _ratio(variance["score_function/random"]["encoder"],
                   variance["amortized/random"]["encoder"])
    if ratio is not None:
        print(f"on random minibatches the score-function encoder gradient is {ratio:.3g} times "
              f"as variable as the exact one")
    print()
    notes = []
    for route in ROUTES:
        row = results[route]
        reached = ("never" if row["seconds_to_em"] is None
                   else f"after {row['seconds_to_em']:.1f} s")
        gap = em["log_likelihood_train"] - row["log_likelihood_train"]
        notes.append(f"{LABELS[route]} {gap:+.4f} nats after {row['seconds']:.1f} s "
                     f"(within {TOLERANCE}: {reached})")
    print(f"Gaps to EM per training point: {'; '.join(notes)}. scikit-learn's EM took "
          f"{em['seconds']:.2f} s in the same run.")


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None where the denominator is round-off (below 1e-12): the
    minibatch is then all the training rows, and the exact estimators do not vary at all."""
    if numerator is None or denominator is None or denominator < 1e-12:
        return None
    return numerator / denominator


if __name__ == "__main__":
    main(build_parser().parse_args())
