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

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import zoo
from zoo import distributed, plots, run_figures, runs
from zoo.convergence import converged, convergence
from zoo.data import Data, binarize, load_data
from zoo.errors import ZooError
from zoo.evaluate import evaluate
from zoo.objectives import make_objective
from zoo.registry import ModelEntry, build, get_model
from zoo.settings import TrainSettings
from zoo.train import (
    fit,
    resolve_device,
    seed_everything,
    torch_threads,
    trainable_parameters,
)
from zoo.validation import check_config, check_memory, check_output, check_work


def make_config(model: str, *, guide: str | None = None, options: dict[str, Any] | None = None,
                data: dict[str, Any] | None = None, objective: dict[str, Any] | None = None,
                train: dict[str, Any] | None = None) -> dict[str, Any]:
    """A complete configuration: the given values over the registry's defaults for ``model``.

    Values that are None count as not given; giving ``epochs`` without ``steps`` trains for
    that many epochs (of one pass each) even where the model's default is a number of steps.
    Giving ``epochs`` or
    ``steps`` (without ``tolerance``) asks for that fixed budget, so it also turns off a default
    of training to convergence and its averaging of iterates, and a default ``plateau``
    schedule becomes ``cosine``;
    ``max_steps`` is the budget of training to convergence. A data file and a
    data folder are made absolute, so the run folder can be used from anywhere.
    """
    entry = get_model(model)
    guide = guide or entry.default_guide
    given = lambda values: {k: v for k, v in (values or {}).items() if v is not None}  # noqa: E731
    data = {"name": None, "file": None, "data_dir": None, "test_fraction": 0.1,
            "standardize": False, "drop_constant": False, **given(data)}
    for key in ("file", "data_dir"):
        if data[key] is not None:
            data[key] = os.path.abspath(os.path.expanduser(data[key]))
    if data["file"] is None and data["name"] is None:
        data["name"] = entry.default_data
    train, defaults = given(train), dict(entry.train)
    if "epochs" in train:  # asking for epochs overrides a default number of steps, and counts
        defaults.pop("steps", None)  # passes over the data
        defaults.pop("passes", None)
    if ("epochs" in train or "steps" in train) and "tolerance" not in train:
        defaults.pop("tolerance", None)
        defaults.pop("average_iterates", None)
        if defaults.get("lr_schedule") == "plateau":
            defaults["lr_schedule"] = "cosine"
    if "max_steps" in train:
        train["steps"] = train.pop("max_steps")
    settings = TrainSettings(**{**defaults, **train})
    data["seed"] = settings.seed
    config = {
        "model": entry.name,
        "guide": guide,
        "options": {**entry.options, **given(options)},
        "data": data,
        "objective": {"name": "elbo", "num_particles": 1, **entry.objectives.get(guide, {}),
                      **given(objective)},
        "train": settings.to_dict(),
        "zoo_version": zoo.__version__,
    }
    check_config(config)
    return config


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
    history: list[dict[str, float]] = field(default_factory=list)
    """One row per finished epoch (:func:`zoo.train.fit`); empty until trained or loaded."""

    @property
    def fingerprint(self) -> str:
        """The digest of the data, splits and labels included (:func:`zoo.runs.fingerprint`)."""
        data = self.data
        return runs.fingerprint(data.x_train, data.y_train, data.x_test, data.y_test)

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
    reproducible too, and they are built with the run's number of CPU threads
    (``settings.threads``), as they are trained: a sum over the data (a column mean, the
    covariance that whitens the encoder's input) rounds differently when split over other
    threads, and from a start that differs in its last digits a long run ends elsewhere. Nothing
    is allocated that would not fit in memory (:func:`_check_memory`), and a configuration that
    records the fingerprint of its data (``data_fingerprint``) is refused when the data loaded
    now differ.
    """
    check_config(config)
    entry = get_model(config["model"])
    settings = TrainSettings(**config["train"], quiet=quiet)
    with torch_threads(settings.threads):
        data = load_data(**config["data"])
        _check_memory(config, settings, data)
        seed_everything(settings.seed)
        model, guide = build(entry, config["guide"], data, config["options"])
        objective = make_objective(**config["objective"])
        experiment = Experiment(config, entry, data, model, guide, objective, settings)
        recorded = config.get("data_fingerprint")
        if recorded is not None and recorded != experiment.fingerprint:
            source = config["data"]["file"] or config["data"]["name"]
            raise ZooError(f"the data of this run ({source}) changed since it was trained: "
                           f"restore the data it was trained on, or train a new run on the new "
                           f"data")
        _check_objective(objective, model, guide, entry.inputs(data, "train"))
        trainable_parameters(model, guide, settings.freeze_model)
    return experiment


def _check_memory(config: dict[str, Any], settings: TrainSettings, data: Data) -> None:
    """Refuse sizes that cannot fit in memory, from a lower bound on the float32 numbers that
    training holds at once: a training step draws P particles of z and evaluates p(x | z) for
    B data points, P B (D + M) numbers; the parameters number at least M + D + K D^2 (K
    mixture components with D x D covariances)."""
    options = config["options"]
    latent, components = options.get("latent_dim") or 0, options.get("components") or 0
    particles = config["objective"]["num_particles"]
    batch, dim = min(settings.batch_size, data.num_train), data.data_dim
    check_memory(particles * batch * (dim + latent) + latent + dim + components * dim**2,
                 f"{particles} particles x batch {batch} x (D {dim} + M {latent}) numbers, "
                 f"with the parameters",
                 "lower --particles, --batch-size, --latent-dim or --components")


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
    """Train a new run described by ``config`` into a fresh run folder; return its path.

    Everything is checked (configuration, data, sizes, output folder) before the folder is
    touched; the folder's lock is held from then until training ends. The configuration
    written records the fingerprint of the data.
    """
    experiment = build_experiment(config, quiet=quiet)
    experiment.config = {**config, "data_fingerprint": experiment.fingerprint}
    run_dir = default_run_dir(config) if out is None else out
    if not distributed.is_main():  # under several processes, rank 0 alone writes the run folder
        _train(experiment, Path(run_dir), checkpoint=None)
        return Path(run_dir)
    with runs.new_run(run_dir, force=force) as run_dir:
        runs.write_config(run_dir, experiment.config)
        _train(experiment, run_dir, checkpoint=None)
    return run_dir


def resume_run(run_dir: str | os.PathLike, *, epochs: int | None = None,
               steps: int | None = None, quiet: bool = False, threads: int | None = None
               ) -> Path:
    """Continue a run from its checkpoint, optionally to a new total of epochs or steps.

    The run folder's lock is held throughout; a new total that is not above the steps already
    trained, a new total for a run that has already converged, a checkpoint that does not
    match the configuration and data that changed since training are refused before
    ``config.json`` is rewritten. ``threads`` replaces the run's number of CPU threads for this
    command only.
    """
    run_dir = Path(run_dir)
    with runs.locked(run_dir) if distributed.is_main() else contextlib.nullcontext():
        config = runs.read_config(run_dir)
        extended = epochs is not None or steps is not None
        if extended:
            epochs = config["train"]["epochs"] if epochs is None else epochs
            config = {key: value for key, value in config.items() if key != "convergence"}
            config["train"] = {**config["train"], "epochs": epochs, "steps": steps}
        checkpoint = runs.load_checkpoint(run_dir)
        this_command = config if threads is None else {
            **config, "train": {**config["train"], "threads": threads}}
        experiment = build_experiment(this_command, quiet=quiet)
        experiment.config = config  # what config.json keeps: the run's own threads
        _load_checkpoint(experiment, checkpoint, run_dir)
        settings = experiment.settings
        total = settings.total_steps(experiment.train_inputs[0].shape[0])
        asked = f"--steps {steps}" if steps is not None else f"--epochs {epochs}"
        if extended and total <= checkpoint["step"]:
            raise ZooError(f"run {run_dir} has already trained {checkpoint['step']} steps "
                           f"({checkpoint['epoch']} epochs) and {asked} means {total} steps in "
                           f"all, so nothing would train: ask for more to continue it")
        if extended and settings.tolerance is not None and converged(checkpoint["history"],
                                                                      settings):
            raise ZooError(f"run {run_dir} has already converged to --tolerance "
                           f"{settings.tolerance:g} after {checkpoint['step']} steps, so "
                           f"{asked} would train nothing; for a longer run train a new one "
                           f"with a fixed budget (--steps) or a smaller --tolerance")
        if extended and distributed.is_main():
            runs.write_config(run_dir, config)
        _train(experiment, run_dir, checkpoint=checkpoint)
    return run_dir


def _load_checkpoint(experiment: Experiment, checkpoint: dict[str, Any], run_dir: Path
                     ) -> None:
    """Load the model and guide of a checkpoint, refusing one of another model or sizes, or
    whose optimizer state does not cover the parameters being trained."""
    runs.load_state(experiment.model, checkpoint["model"], "model", run_dir)
    runs.load_state(experiment.guide, checkpoint["guide"], "guide", run_dir)
    trained = trainable_parameters(experiment.model, experiment.guide,
                                   experiment.settings.freeze_model)
    groups = checkpoint["optimizer"].get("param_groups")
    if not isinstance(groups, list) or sum(len(group.get("params", ())) for group in groups
                                           ) != len(trained):
        raise ZooError(f"{run_dir / runs.CHECKPOINT} does not match {runs.CONFIG} (its "
                       f"optimizer state is not that of the {len(trained)} parameter tensors "
                       f"trained): train the run again (zoo train ... --out {run_dir} --force)")


def _train(experiment: Experiment, run_dir: Path, checkpoint: dict[str, Any] | None) -> None:
    try:
        history = fit(experiment.model, experiment.guide, experiment.objective,
                      experiment.train_inputs, test=experiment.test_inputs,
                      settings=experiment.settings, run_dir=run_dir, checkpoint=checkpoint,
                      transform=experiment.train_transform,
                      before_stop=experiment.entry.before_stop,
                      desc=f"training {experiment.entry.name} ({experiment.config['guide']} guide)")
    except KeyboardInterrupt:
        kept = (f"the checkpoint of the last finished epoch is kept (continue with: zoo train "
                f"--resume {run_dir})" if (run_dir / runs.CHECKPOINT).is_file() else
                "no epoch had finished, so no checkpoint was written (start again with "
                f"--out {run_dir} --force)")
        raise KeyboardInterrupt(kept) from None
    if distributed.is_main():
        runs.write_config(run_dir, {**experiment.config,
                                    "convergence": convergence(history, experiment.settings)})
    experiment.model.cpu(), experiment.guide.cpu()
    if distributed.is_main():
        run_figures.draw_figures(experiment, history, run_dir / runs.FIGURES)


def load_run(run_dir: str | os.PathLike) -> Experiment:
    """Rebuild a trained run, on the CPU, with the parameters of its last checkpoint."""
    config = runs.read_config(run_dir)
    checkpoint = runs.load_checkpoint(run_dir)
    experiment = build_experiment(config, quiet=True)
    runs.load_state(experiment.model, checkpoint["model"], "model", run_dir)
    runs.load_state(experiment.guide, checkpoint["guide"], "guide", run_dir)
    experiment.history = list(checkpoint["history"])
    return experiment


def evaluate_run(run_dir: str | os.PathLike, *, num_samples: int = 1000,
                 splits: tuple[str, ...] = ("train", "test"), device: str = "cpu",
                 quiet: bool = False) -> dict[str, Any]:
    """Per-data-point metrics of a trained run, ``{"train": {...}, "test": {...}}`` (``test``
    only when the run has a test split; ``splits`` picks which), computed with a fixed seed on
    ``device`` (``cpu``, ``cuda`` or ``auto``), with a progress bar per split unless ``quiet``."""
    if num_samples < 1:
        raise ZooError(f"--particles must be at least 1; got {num_samples}")
    if not splits or set(splits) - {"train", "test"}:
        raise ZooError(f"splits must be train and/or test; got {', '.join(splits) or 'none'}")
    where = distributed.setup(resolve_device(device))
    experiment = load_run(run_dir)
    work = sum(inputs[0].numel() * num_samples for split in splits
               if (inputs := experiment.entry.inputs(experiment.data, split)) is not None)
    check_work(work, f"{num_samples} particles x data points x D over the {' and '.join(splits)} "
                     f"split", "lower --particles, or evaluate --split test alone")
    seed_everything(experiment.settings.seed)
    model, guide = experiment.model.to(where).eval(), experiment.guide.to(where).eval()
    train_x = experiment.data.x_train.to(where)
    result = {}
    for split in splits:
        inputs = experiment.inputs(split)
        if inputs is not None:
            result[split] = evaluate(model, guide, *(tensor.to(where) for tensor in inputs),
                                     num_samples=num_samples, train_x=train_x,
                                     seed=experiment.settings.seed,
                                     quiet=quiet or not distributed.is_main(),
                                     desc=f"evaluating the {split} split")
            if experiment.entry.metrics is not None:
                result[split].update(experiment.entry.metrics(model, inputs[0].to(where)))
    return result


def plot_run(run_dir: str | os.PathLike, kind: str | None = None,
             out: str | os.PathLike | None = None) -> Path:
    """Draw the figure ``kind`` of a trained run (see :func:`zoo.run_figures.plot_kinds`; None:
    the first) into ``out`` (default ``RUN/figures/<kind>.png``; ``.png`` is added to a name
    without a suffix); return the path written."""
    if out is not None:
        out = check_output(plots.figure_path(out), folder=False)
    experiment = load_run(run_dir)
    kinds = run_figures.plot_kinds(experiment)
    kind = kind or next(iter(kinds))
    if kind not in kinds:
        raise ZooError(f"unknown plot kind '{kind}' for model {experiment.entry.name}; "
                       f"choose one of: {', '.join(kinds)}")
    seed_everything(experiment.settings.seed)
    experiment.model.eval(), experiment.guide.eval()
    path = out if out is not None else Path(run_dir) / runs.FIGURES / f"{kind}.png"
    with torch.no_grad():
        return kinds[kind](experiment, path)
