"""An experiment: a configuration (plain JSON) and everything rebuilt from it.

The configuration is what ``config.json`` in a run folder holds, so a run can always be
rebuilt, resumed and evaluated from its folder alone:

    {"model": "ppca", "guide": "full", "options": {"latent_dim": 2},
     "data": {"name": "synthetic-ppca", "file": null, "data_dir": null,
              "test_fraction": 0.1, "standardize": false, "seed": 0},
     "objective": {"name": "elbo", "num_particles": 1},
     "train": {"epochs": 10, "steps": 3000, "batch_size": 256, "lr": 0.01, ...}}
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import zoo
from zoo import plots, runs
from zoo.data import Data, binarize, load_data
from zoo.errors import ZooError
from zoo.evaluate import evaluate
from zoo.objectives import make_objective, traced_loss
from zoo.registry import ModelEntry, build, get_model
from zoo.train import (
    TrainSettings,
    convergence,
    fit,
    resolve_device,
    seed_everything,
    trainable_parameters,
)


def make_config(model: str, *, guide: str | None = None, options: dict[str, Any] | None = None,
                data: dict[str, Any] | None = None, objective: dict[str, Any] | None = None,
                train: dict[str, Any] | None = None) -> dict[str, Any]:
    """A complete configuration: the given values over the registry's defaults for ``model``.

    Values that are None count as not given; giving ``epochs`` without ``steps`` trains for
    that many epochs even where the model's default is a number of steps. Giving ``epochs`` or
    ``steps`` (without ``tolerance``) asks for that fixed budget, so it also turns off a default
    of training to convergence, and a default ``plateau`` schedule becomes ``cosine``;
    ``max_steps`` is the budget of training to convergence. A data file and a
    data folder are made absolute, so the run folder can be used from anywhere.
    """
    entry = get_model(model)
    guide = guide or entry.default_guide
    given = lambda values: {k: v for k, v in (values or {}).items() if v is not None}  # noqa: E731
    data = {"name": None, "file": None, "data_dir": None, "test_fraction": 0.1,
            "standardize": False, **given(data)}
    for key in ("file", "data_dir"):
        if data[key] is not None:
            data[key] = os.path.abspath(os.path.expanduser(data[key]))
    if data["file"] is None and data["name"] is None:
        data["name"] = entry.default_data
    train, defaults = given(train), dict(entry.train)
    if "epochs" in train:  # asking for epochs overrides a default number of steps
        defaults.pop("steps", None)
    if ("epochs" in train or "steps" in train) and "tolerance" not in train:
        defaults.pop("tolerance", None)
        if defaults.get("lr_schedule") == "plateau":
            defaults["lr_schedule"] = "cosine"
    if "max_steps" in train:
        train["steps"] = train.pop("max_steps")
    settings = TrainSettings(**{**defaults, **train})
    data["seed"] = settings.seed
    return {
        "model": entry.name,
        "guide": guide,
        "options": {**entry.options, **given(options)},
        "data": data,
        "objective": {"name": "elbo", "num_particles": 1, **entry.objectives.get(guide, {}),
                      **given(objective)},
        "train": settings.to_dict(),
        "zoo_version": zoo.__version__,
    }


@dataclass
class Experiment:
    """Everything a configuration describes, built and ready to train or evaluate."""

    config: dict[str, Any]
    entry: ModelEntry
    data: Data
    model: torch.nn.Module
    guide: torch.nn.Module
    objective: Any
    settings: TrainSettings

    @property
    def binarized(self) -> bool:
        return self.entry.binarized(self.config["options"])

    def inputs(self, split: str) -> tuple[torch.Tensor, ...] | None:
        """Model and guide inputs of a split for evaluation (None without that split); binary
        models see one fixed seeded binarization of the grey levels."""
        inputs = self.entry.inputs(self.data, split)
        if inputs is None or not self.binarized:
            return inputs
        generator = torch.Generator().manual_seed(self.config["data"]["seed"] + (split == "test"))
        return (binarize(inputs[0], generator), *inputs[1:])

    @property
    def train_inputs(self) -> tuple[torch.Tensor, ...]:
        """The grey-level training inputs; ``train_transform`` binarizes them each epoch."""
        return self.entry.inputs(self.data, "train")

    @property
    def test_inputs(self) -> tuple[torch.Tensor, ...] | None:
        return self.inputs("test")

    @property
    def train_transform(self):
        """Dynamic binarization for binary models, else None."""
        if not self.binarized:
            return None
        return lambda inputs: (binarize(inputs[0]), *inputs[1:])


def build_experiment(config: dict[str, Any], *, quiet: bool = False) -> Experiment:
    """Load the data and build model, guide, objective and settings from ``config``.

    The seed is set before the model and guide are built, so their initial values are
    reproducible too.
    """
    entry = get_model(config["model"])
    settings = TrainSettings(**config["train"], quiet=quiet)
    data = load_data(**config["data"])
    seed_everything(settings.seed)
    model, guide = build(entry, config["guide"], data, config["options"])
    objective = make_objective(**config["objective"])
    _check_objective(objective, model, guide, entry.inputs(data, "train"))
    trainable_parameters(model, guide, settings.freeze_model)
    if settings.jit:
        traced_loss(objective, model, guide)  # refuses objectives it cannot trace
    return Experiment(config, entry, data, model, guide, objective, settings)


def _check_objective(objective, model, guide, inputs: tuple[torch.Tensor, ...]) -> None:
    """Fail before anything is written when the objective cannot train this model and guide
    (free bits without a factorized Gaussian guide, a discrete guide with a pathwise gradient,
    global latent variables for a per-data-point bound): one evaluation on two data points,
    on a private random stream."""
    with torch.random.fork_rng(devices=[]):
        objective.differentiable_loss(model, guide, *(tensor[:2] for tensor in inputs))


def default_run_dir(config: dict[str, Any], root: str = "runs") -> Path:
    data = config["data"]
    dataset = data["name"] or Path(data["file"]).stem
    return Path(root) / f"{config['model']}-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


def train_run(config: dict[str, Any], out: str | os.PathLike | None = None, *,
              force: bool = False, quiet: bool = False) -> Path:
    """Train a new run described by ``config`` into a fresh run folder; return its path."""
    experiment = build_experiment(config, quiet=quiet)
    run_dir = runs.create_run_dir(out or default_run_dir(config), force=force)
    runs.write_config(run_dir, config)
    _train(experiment, run_dir, checkpoint=None)
    return run_dir


def resume_run(run_dir: str | os.PathLike, *, epochs: int | None = None,
               steps: int | None = None, quiet: bool = False) -> Path:
    """Continue a run from its checkpoint, optionally to a new total of epochs or steps."""
    run_dir = Path(run_dir)
    config = runs.read_config(run_dir)
    if epochs is not None or steps is not None:
        config["train"].update(epochs=epochs or config["train"]["epochs"], steps=steps)
        runs.write_config(run_dir, config)
    experiment = build_experiment(config, quiet=quiet)
    _train(experiment, run_dir, checkpoint=runs.load_checkpoint(run_dir))
    return run_dir


def _train(experiment: Experiment, run_dir: Path, checkpoint: dict[str, Any] | None) -> None:
    history = fit(experiment.model, experiment.guide, experiment.objective,
                  experiment.train_inputs, test=experiment.test_inputs,
                  settings=experiment.settings, run_dir=run_dir, checkpoint=checkpoint,
                  transform=experiment.train_transform)
    runs.write_config(run_dir, {**experiment.config,
                                "convergence": convergence(history, experiment.settings)})
    experiment.model.cpu(), experiment.guide.cpu()
    draw_figures(experiment, history, run_dir / runs.FIGURES)


@torch.no_grad()
def draw_figures(experiment: Experiment, history: list[dict[str, float]], folder: Path
                 ) -> list[Path]:
    """The figures that apply to this run: always the loss curves (with the closed-form optimum
    as reference when the model has one); exact against approximate posteriors of a few
    training points, over the first two latent dimensions, when the model has a closed-form
    posterior and the guide exposes q; and the model's own figures (``ModelEntry.figures``)."""
    model, guide, x = experiment.model, experiment.guide, experiment.data.x_train
    reference = None
    if hasattr(model, "maximum_likelihood"):
        reference = -model.maximum_likelihood(x).marginal_log_prob(x).mean().item()
    figures = [plots.plot_training(history, folder / "loss.png", reference=reference,
                                   reference_label="closed-form optimum")]
    points = x[:6]
    if (hasattr(model, "posterior") and hasattr(guide, "distribution")
            and guide.distribution(points).event_shape[-1:] >= (2,)):
        figures.append(plots.plot_posterior_ellipses(
            model.posterior(points), guide.distribution(points), folder / "posterior.png",
            title=f"{experiment.entry.name}: exact vs {experiment.config['guide']} guide"))
    experiment.model.eval(), experiment.guide.eval()
    figures += [experiment.entry.plots[kind](experiment, folder / f"{kind}.png")
                for kind in experiment.entry.figures]
    return figures


def load_run(run_dir: str | os.PathLike) -> Experiment:
    """Rebuild a trained run, on the CPU, with the parameters of its last checkpoint."""
    config = runs.read_config(run_dir)
    checkpoint = runs.load_checkpoint(run_dir)
    experiment = build_experiment(config, quiet=True)
    experiment.model.load_state_dict(checkpoint["model"])
    experiment.guide.load_state_dict(checkpoint["guide"])
    return experiment


def evaluate_run(run_dir: str | os.PathLike, *, num_samples: int = 1000,
                 splits: tuple[str, ...] = ("train", "test"), device: str = "cpu"
                 ) -> dict[str, Any]:
    """Per-data-point metrics of a trained run, ``{"train": {...}, "test": {...}}`` (``test``
    only when the run has a test split; ``splits`` picks which), computed with a fixed seed on
    ``device`` (``cpu``, ``cuda`` or ``auto``)."""
    if num_samples < 1:
        raise ZooError(f"--particles must be at least 1; got {num_samples}")
    if not splits or set(splits) - {"train", "test"}:
        raise ZooError(f"splits must be train and/or test; got {', '.join(splits) or 'none'}")
    where = resolve_device(device)
    experiment = load_run(run_dir)
    seed_everything(experiment.settings.seed)
    model, guide = experiment.model.to(where).eval(), experiment.guide.to(where).eval()
    train_x = experiment.data.x_train.to(where)
    result = {}
    for split in splits:
        inputs = experiment.inputs(split)
        if inputs is not None:
            result[split] = evaluate(model, guide, *(tensor.to(where) for tensor in inputs),
                                     num_samples=num_samples, train_x=train_x)
    return result


def plot_run(run_dir: str | os.PathLike, kind: str | None = None,
             out: str | os.PathLike | None = None) -> Path:
    """Draw the figure ``kind`` of a trained run (the model's ``plots`` list the kinds; None:
    the first) into ``out`` (default ``RUN/figures/<kind>.png``); return its path."""
    experiment = load_run(run_dir)
    if not experiment.entry.plots:
        raise ZooError(f"model {experiment.entry.name} has no figures for zoo plot; those of "
                       f"its training run are in {Path(run_dir) / runs.FIGURES}")
    kind = kind or next(iter(experiment.entry.plots))
    if kind not in experiment.entry.plots:
        kinds = ", ".join(experiment.entry.plots)
        raise ZooError(f"unknown plot kind '{kind}' for model {experiment.entry.name}; "
                       f"choose one of: {kinds}")
    seed_everything(experiment.settings.seed)
    experiment.model.eval(), experiment.guide.eval()
    path = Path(out) if out is not None else Path(run_dir) / runs.FIGURES / f"{kind}.png"
    with torch.no_grad():
        return experiment.entry.plots[kind](experiment, path)
