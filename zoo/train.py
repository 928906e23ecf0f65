"""The training engine shared by every model, guide and objective.

One loop: the data stay in memory as tensors, each epoch visits them in a fresh random order
in index-based minibatches, and each step minimizes

    loss = objective.differentiable_loss(model, guide, *batch) / batch_size,

the objective in nats per data point, with a torch optimizer over the parameters of model and
guide. A run is reproducible from its seed: with the same seed, a CPU run gives bitwise the
same parameters, and a run stopped after any epoch and resumed from its checkpoint ends where
the uninterrupted run ends (the checkpoint holds the optimizer and all random-number states).

Pyro's and torch's argument checks (supports, shapes, parameter constraints) run on the first
step of each call to :func:`fit`, where a mismatch between model and data shows up, and are
switched off for the steps after it, where they would only cost time (about 15% of a step of a
small VAE). A non-finite loss stops training at the step where it appears. A non-finite gradient
with a finite loss makes the parameters non-finite, hence the next step's loss: it is caught
one step later, and at the latest by a check of the parameters before each checkpoint, so a
checkpoint on disk always holds finite parameters. (Checking the gradients themselves at every
step would cost a pass over all of them, about 4% of a step of the MNIST VAE.)

Under several processes (torchrun, ``zoo train --nproc N``) each rank computes the loss of its
share of every batch and the gradients are summed over the ranks (:mod:`zoo.distributed`):
the same steps as one process, and rank 0 alone writes the run folder.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pyro
import torch
from pyro.distributions import is_validation_enabled
from torch.nn.utils import clip_grad_norm_
from tqdm.auto import tqdm

from zoo import distributed
from zoo.compiled import STEPS, step_loss
from zoo.errors import ZooError
from zoo.runs import CHECKPOINT, append_metrics, save_checkpoint, write_metrics

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}


@runtime_checkable
class StepScaled(Protocol):
    """A module whose parameters live in the units of the data: ``step_scales()`` maps the names
    of such parameters to the data's scale, and the learning rate of each is multiplied by it.

    Adam moves every parameter by about ``lr`` per step whatever its gradient's size, so a
    loading matrix of entries near 0.01 (or 1000) needs a learning rate 100 times smaller (or
    larger) than one of entries near 1; scaling the step with the data makes one default
    learning rate fit tables of any scale. It is the same as training ``W / s`` at ``lr``.
    """

    def step_scales(self) -> dict[str, float]: ...


def parameter_groups(modules: Sequence[torch.nn.Module], parameters: list[torch.nn.Parameter]
                     ) -> list[dict[str, Any]]:
    """``parameters`` in groups of equal ``step_scale`` (1 unless a :class:`StepScaled` module
    declares another), in the order of their first member, for the optimizer."""
    scales: dict[torch.nn.Parameter, float] = {}
    for module in modules:
        if isinstance(module, StepScaled):
            named = dict(module.named_parameters())
            scales.update({named[name]: scale for name, scale in module.step_scales().items()})
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for parameter in parameters:
        groups.setdefault(scales.get(parameter, 1.0), []).append(parameter)
    return [{"params": members, "step_scale": scale} for scale, members in groups.items()]


def make_optimizer(name: str, parameters: list[torch.nn.Parameter] | list[dict[str, Any]],
                   lr: float) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``parameters`` (or parameter groups), with torch's fused
    kernel: one pass over all parameters per step instead of a few small operations per tensor,
    the same update up to rounding (at batch 20 on an MNIST VAE it saves about a quarter of a CPU
    training step)."""
    return OPTIMIZERS[name](parameters, lr=lr, fused=True)


LR_SCHEDULES: dict[str, Callable[[float], float]] = {
    "constant": lambda progress: 1.0,
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
    "plateau": lambda progress: 1.0,
}
"""Schedule name -> learning-rate factor as a function of the share of steps done, in [0, 1].
``plateau`` is constant between the plateaus of the loss, where :func:`lr_factor` halves it."""

PLATEAU_HALVINGS = 5
"""The ``plateau`` schedule halves the learning rate at each plateau of the loss, at most this
many times; training to convergence stops at the plateau reached at the smallest rate."""


class TrainingDiverged(ZooError):
    """The loss or its gradient stopped being finite; the last good checkpoint stays on disk."""


def _diverged(what: str, run_dir: Path | None, epoch: int) -> TrainingDiverged:
    kept = (f"the last good checkpoint (epoch {epoch - 1}) stays in {run_dir / CHECKPOINT}"
            if run_dir is not None and epoch > 1 else "no checkpoint was written")
    return TrainingDiverged(f"training stopped: {what}; {kept}. Lower --lr or set --clip-norm.")


@dataclass
class TrainSettings:
    """How to train. ``steps``, when given, overrides ``epochs`` (the last epoch may be partial).

    ``lr_schedule`` is ``constant``, ``cosine``: lr_t = lr (1 + cos(pi t / T)) / 2 at step t of
    T, which lets stochastic gradients settle at the optimum instead of jittering around it, or
    ``plateau`` (needs ``tolerance``): lr halved each time the loss stops improving by
    ``tolerance`` per epoch, down to lr / 2^PLATEAU_HALVINGS, the same settling without a
    fixed number of steps.
    ``clip_norm`` clips the global gradient norm; ``device`` is ``cpu``, ``cuda`` or ``auto``.
    ``freeze_model`` trains the guide alone, with the model's parameters held where they are.
    ``step`` is ``auto`` (compiled for runs long enough to repay the compilation), ``compiled``
    or ``eager`` (:func:`zoo.compiled.step_loss`).

    ``tolerance``, when given, trains to convergence: training stops before the budget of
    ``steps`` (or ``epochs``) once the loss on the whole training set, smoothed over
    ``patience`` epochs, improves by less than ``tolerance`` nats per data point per epoch
    (:func:`improvement`; with the plateau schedule, at its smallest learning rate); without it
    the budget is a fixed number of steps. ``threads`` is the number of CPU threads torch uses
    during training (None: torch's default).
    """

    epochs: int = 10
    steps: int | None = None
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    lr_schedule: str = "constant"
    clip_norm: float | None = None
    seed: int = 0
    device: str = "cpu"
    freeze_model: bool = False
    step: str = "auto"
    tolerance: float | None = None
    patience: int = 10
    threads: int | None = None
    quiet: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, f"--epochs must be at least 1; got {self.epochs}"),
            (self.steps is None or self.steps >= 1,
             f"--steps must be at least 1; got {self.steps}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1; got {self.batch_size}"),
            (self.lr > 0, f"--lr must be positive; got {self.lr}"),
            (0 <= self.seed < 2**32, f"--seed must be in [0, 2^32); got {self.seed}"),
            (self.clip_norm is None or self.clip_norm > 0,
             f"--clip-norm must be positive; got {self.clip_norm}"),
            (self.optimizer in OPTIMIZERS,
             f"unknown optimizer '{self.optimizer}'; choose one of: {', '.join(OPTIMIZERS)}"),
            (self.lr_schedule in LR_SCHEDULES,
             f"unknown --lr-schedule '{self.lr_schedule}'; choose one of: "
             f"{', '.join(LR_SCHEDULES)}"),
            (self.tolerance is None or self.tolerance > 0,
             f"--tolerance must be positive; got {self.tolerance}"),
            (self.lr_schedule != "plateau" or self.tolerance is not None,
             "--lr-schedule plateau needs --tolerance: it halves the learning rate where the "
             "loss improves by less than that"),
            (self.patience >= 1, f"--patience must be at least 1; got {self.patience}"),
            (self.threads is None or self.threads >= 1,
             f"--threads must be at least 1; got {self.threads}"),
            (self.device in ("cpu", "cuda", "auto"),
             f"--device must be cpu, cuda or auto; got '{self.device}'"),
            (self.step in STEPS,
             f"train.step must be one of {', '.join(STEPS)}; got '{self.step}'"),
        ]
        for ok, message in checks:
            if not ok:
                raise ZooError(message)

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if key != "quiet"}

    def total_steps(self, num_train: int) -> int:
        """The optimizer steps of the whole run on ``num_train`` data points: ``steps``, else
        ``epochs`` times the steps of one epoch, ceil(N / min(batch_size, N))."""
        return self.steps or self.epochs * math.ceil(num_train / min(self.batch_size, num_train))


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (Pyro draws from torch's)."""
    pyro.set_rng_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when it is available; ``cuda`` without a GPU is an error."""
    if name not in ("cpu", "cuda", "auto"):
        raise ZooError(f"--device must be cpu, cuda or auto; got '{name}'")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ZooError("--device cuda was asked for but torch sees no CUDA GPU; "
                       "use --device cpu or --device auto")
    return torch.device(name)


def rng_state() -> dict[str, Any]:
    """Every random-number state a run draws from, in a form ``weights_only`` loading accepts."""
    name, key, position, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, torch.from_numpy(key.astype(np.int64)), position, has_gauss, gauss]}
    if torch.cuda.is_initialized():  # the generator training draws from: the current GPU's
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, key, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), position, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]  # older checkpoints hold a list: the state of every GPU
        torch.cuda.set_rng_state(cuda[torch.cuda.current_device()] if isinstance(cuda, list)
                                 else cuda)  # on this rank's GPU, under several processes


def trainable_parameters(model: torch.nn.Module, guide: torch.nn.Module, freeze_model: bool
                         ) -> list[torch.nn.Parameter]:
    """The parameters training moves: the guide's, and the model's unless ``freeze_model``."""
    parameters = [*guide.parameters()] + ([] if freeze_model else [*model.parameters()])
    if not parameters:
        raise ZooError("--freeze-model holds the model fixed, and this guide has no parameters "
                       "of its own: there is nothing to train. Drop --freeze-model or choose a "
                       "guide with parameters" if freeze_model else
                       "neither the model nor the guide has parameters: there is nothing to train")
    return parameters


def improvement(losses: Sequence[float], patience: int) -> float | None:
    """How much the loss still improves per epoch, smoothed over epochs.

    With l_e the loss at the end of epoch e (nats per data point), E epochs done and
    P = ``patience``: the mean of l over epochs E - 2P + 1 .. E - P minus its mean over
    E - P + 1 .. E, divided by the P epochs between them. Positive while training improves the
    loss; None before 2 P epochs.

    Training to convergence measures l_e as the loss on the whole training set with the same
    random draws at every epoch (``average_loss`` with the run's seed, the ``fit_loss`` column):
    the differences between epochs are then those of the parameters, not of the draws, so a
    slow improvement stands out of the noise that a minibatch average over an epoch carries.
    """
    if len(losses) < 2 * patience:
        return None
    before, last = losses[-2 * patience:-patience], losses[-patience:]
    return (sum(before) - sum(last)) / patience**2


def _plateau(history: Sequence[dict[str, Any]], settings: TrainSettings) -> bool:
    """Whether the last epoch ended a plateau: an improvement below ``settings.tolerance``."""
    rate = history[-1].get("improvement") if history else None
    return settings.tolerance is not None and rate is not None and rate < settings.tolerance


def lr_factor(history: Sequence[dict[str, Any]], settings: TrainSettings) -> float:
    """The plateau schedule's factor for the next epoch: that of the last epoch, halved when
    that epoch ended a plateau (at most ``PLATEAU_HALVINGS`` times); 1 for other schedules."""
    if not history:
        return 1.0
    factor = history[-1].get("lr_factor", 1.0)
    halve = (settings.lr_schedule == "plateau" and _plateau(history, settings)
             and factor > 2.0**-PLATEAU_HALVINGS)
    return factor / 2 if halve else factor


def converged(history: Sequence[dict[str, Any]], settings: TrainSettings) -> bool:
    """Whether training to convergence (``settings.tolerance``) has stopped improving: a
    plateau, for the plateau schedule at its smallest learning rate."""
    return _plateau(history, settings) and (
        settings.lr_schedule != "plateau"
        or history[-1].get("lr_factor", 1.0) <= 2.0**-PLATEAU_HALVINGS)


def convergence(history: Sequence[dict[str, Any]], settings: TrainSettings) -> dict[str, Any]:
    """How a run ended: ``converged`` (None for a fixed budget), ``steps`` done, the last
    ``improvement`` per epoch (nats per data point, None before 2 ``patience`` epochs) and the
    ``tolerance``; config.json, ``zoo evaluate --json`` and the report show it."""
    return {"converged": None if settings.tolerance is None else converged(history, settings),
            "steps": history[-1]["step"] if history else 0,
            "improvement": history[-1].get("improvement") if history else None,
            "tolerance": settings.tolerance}


def describe_convergence(summary: dict[str, Any]) -> str:
    """One line for a :func:`convergence` summary."""
    steps, rate, tolerance = summary["steps"], summary["improvement"], summary["tolerance"]
    if summary["converged"] is None:
        return f"training: a fixed budget of {steps} steps"
    still = "" if rate is None else f", improving by {rate:.2g} nats per point per epoch"
    if summary["converged"]:
        return f"training: converged after {steps} steps{still} (tolerance {tolerance:g})"
    return f"training: NOT converged within its budget of {steps} steps{still} " \
           f"(tolerance {tolerance:g})"


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the body with torch using ``threads`` CPU threads (None: leave it as it is)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def average_loss(objective, model, guide, data: Sequence[torch.Tensor], *, seed: int,
                 chunk_size: int = 4096) -> float:
    """The objective's loss per data point over ``data``, under a private random stream seeded
    with ``seed``, so evaluating never changes what training draws next."""
    devices = [data[0].device] if data[0].device.type == "cuda" else []
    was_training = model.training, guide.training
    model.eval(), guide.eval()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        total = sum(objective.differentiable_loss(
                        model, guide, *(tensor[start:start + chunk_size] for tensor in data))
                    for start in range(0, data[0].shape[0], chunk_size))
    model.train(was_training[0]), guide.train(was_training[1])
    return float(total) / data[0].shape[0]


def fit(model: torch.nn.Module, guide: torch.nn.Module, objective, train: Sequence[torch.Tensor],
        *, test: Sequence[torch.Tensor] | None = None, settings: TrainSettings | None = None,
        run_dir: Path | None = None, checkpoint: dict[str, Any] | None = None,
        transform: Callable[[tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]] | None = None,
        on_epoch: Callable[[dict[str, float]], None] | None = None, desc: str = "training"
        ) -> list[dict[str, float]]:
    """Train ``model`` and ``guide`` on ``train`` (a tuple of tensors whose first dimension
    indexes data points, passed to model and guide as positional arguments).

    Returns the history: one dict per epoch with ``epoch``, ``step``, ``train_loss`` (mean loss
    per data point over the epoch's steps), ``test_loss`` (on ``test``, or None), ``seconds`` and
    ``improvement`` (:func:`improvement`). With ``settings.tolerance`` training stops once it
    has converged (:func:`converged`), and warns when the budget ends first.
    With ``run_dir``, each epoch appends its row to metrics.csv and replaces checkpoint.pt;
    with ``checkpoint`` (a dict from :func:`zoo.runs.load_checkpoint`), training continues from
    it. ``transform``, when given, maps ``train`` to the tensors of each new epoch (dynamic
    binarization draws fresh binary images from the grey levels this way), drawing from torch's
    generator so that resuming stays exact. An objective with a ``set_progress(epochs)`` method
    (KL annealing) is told before each step how many epochs are done, as a float.
    With ``settings.freeze_model`` only the guide's parameters are trained. The progress bar
    (unless ``settings.quiet``) is labelled ``desc``.
    """
    settings = settings or TrainSettings()
    with torch_threads(settings.threads):
        return _fit(model, guide, objective, train, test, settings, run_dir, checkpoint,
                    transform, on_epoch, desc)


def _fit(model, guide, objective, train, test, settings, run_dir, checkpoint, transform,
         on_epoch, desc) -> list[dict[str, float]]:
    distributed.check(settings.batch_size, getattr(objective, "free_bits", 0.0))
    device = distributed.setup(resolve_device(settings.device))
    model.to(device), guide.to(device)
    train = tuple(tensor.to(device) for tensor in train)
    test = None if test is None else tuple(tensor.to(device) for tensor in test)
    parameters = trainable_parameters(model, guide, settings.freeze_model)
    shared_guide = distributed.share_guide(guide)
    model.requires_grad_(not settings.freeze_model)
    optimizer = make_optimizer(settings.optimizer, parameter_groups((model, guide), parameters),
                               settings.lr)

    num_train = train[0].shape[0]
    batch_size = min(settings.batch_size, num_train)
    steps_per_epoch = math.ceil(num_train / batch_size)
    total_steps = settings.total_steps(num_train)
    set_progress = getattr(objective, "set_progress", None)
    schedule = LR_SCHEDULES[settings.lr_schedule]
    history: list[dict[str, float]] = []
    step = 0
    if checkpoint is None:
        seed_everything(settings.seed)
    else:
        model.load_state_dict(checkpoint["model"])
        guide.load_state_dict(checkpoint["guide"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        history, step = list(checkpoint["history"]), checkpoint["step"]
        set_rng_state(checkpoint["rng"])
        if run_dir is not None and distributed.is_main():
            write_metrics(run_dir, history)

    validate, first_step = is_validation_enabled(), step
    loss_of = step_loss(objective, model, shared_guide,
                        settings.step if distributed.world_size() == 1 else "eager", total_steps,
                        done=step, budget_is_cap=settings.tolerance is not None)
    bar = tqdm(total=total_steps, initial=step, unit="step",
               disable=settings.quiet or not distributed.is_main(),
               dynamic_ncols=True, desc=desc)
    try:
        while step < total_steps and not converged(history, settings):
            epoch = len(history) + 1
            factor = lr_factor(history, settings)
            started = time.perf_counter()
            loss_sum, seen = torch.zeros((), device=device), 0
            epoch_data = train if transform is None else transform(train)
            order = torch.randperm(num_train, device=device)
            for begin in range(0, num_train, batch_size):
                if step == total_steps:
                    break
                batch = tuple(tensor[order[begin:begin + batch_size]] for tensor in epoch_data)
                if set_progress is not None:
                    set_progress(step / steps_per_epoch)
                size = batch[0].shape[0]
                with pyro.validation_enabled(validate and step == first_step):
                    loss = distributed.share_loss(loss_of, batch) / size
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                loss = distributed.sum_gradients(parameters, loss)
                if not bool(torch.isfinite(loss)):
                    raise _diverged(f"the loss is not finite at epoch {epoch}, step "
                                    f"{begin // batch_size + 1} (step {step + 1} overall)",
                                    run_dir, epoch)
                if settings.clip_norm is not None:
                    clip_grad_norm_(parameters, settings.clip_norm)
                for group in optimizer.param_groups:
                    group["lr"] = (settings.lr * group.get("step_scale", 1.0) * factor
                                   * schedule(step / total_steps))
                optimizer.step()
                step += 1
                loss_sum += loss.detach() * size
                seen += size
                bar.update()
            seconds = time.perf_counter() - started
            if not all(bool(torch.isfinite(parameter).all()) for parameter in parameters):
                raise _diverged(f"the parameters are not finite after step {step} (the end of "
                                f"epoch {epoch}): a gradient was not finite", run_dir, epoch)
            row = {"epoch": epoch, "step": step, "train_loss": loss_sum.item() / seen,
                   "test_loss": None if test is None or not distributed.is_main()
                   else average_loss(objective, model, guide, test, seed=settings.seed + epoch),
                   "seconds": seconds}
            if settings.tolerance is not None:
                row["fit_loss"] = distributed.from_main(  # one pass, the same on every rank
                    average_loss(objective, model, guide, train, seed=settings.seed)
                    if distributed.is_main() else None)
                row["lr_factor"] = factor
                row["improvement"] = improvement(  # over the epochs at this learning rate
                    [past["fit_loss"] for past in [*history, row] if past["lr_factor"] == factor],
                    settings.patience)
            history.append(row)
            bar.set_postfix({"epoch": epoch, "loss": f"{row['train_loss']:.4g}",
                             "items/s": f"{seen / seconds:.0f}"}, refresh=False)
            if run_dir is not None and distributed.is_main():
                append_metrics(run_dir, row)
                save_checkpoint(run_dir, {
                    "model": model.state_dict(), "guide": guide.state_dict(),
                    "optimizer": optimizer.state_dict(), "epoch": epoch, "step": step,
                    "history": history,
                    "rng": rng_state()})
            row["test_loss"] = distributed.from_main(row["test_loss"])
            if on_epoch is not None:
                on_epoch(row)
    finally:
        bar.close()
        model.requires_grad_(True)
    warn_if_diverged(history)
    if settings.tolerance is not None and not converged(history, settings):
        rate = history[-1]["improvement"]
        still = ("" if rate is None else
                 f" (the loss still improves by {rate:.2g} nats per point per epoch)")
        warnings.warn(f"training used its budget of {total_steps} steps without converging to "
                      f"--tolerance {settings.tolerance:g}{still}; give it more room with "
                      f"--max-steps {2 * total_steps}"
                      + (f" (or zoo train --resume {run_dir} --steps {2 * total_steps})"
                         if run_dir is not None else ""), stacklevel=2)
    return history


def warn_if_diverged(history: Sequence[dict[str, float]]) -> None:
    """Warn when the last epoch's training loss L_last (nats per data point) ended far above
    the best epoch's, L_last > L_best + 10 (|L_best| + 1): a loss that grew without becoming
    infinite, which the checks for non-finite values do not stop."""
    if len(history) < 2:
        return
    best = min(history, key=lambda row: row["train_loss"])
    last, lowest = history[-1]["train_loss"], best["train_loss"]
    if last > lowest + 10 * (abs(lowest) + 1):
        warnings.warn(f"training diverged: the last epoch's loss, {last:.4g} nats per data "
                      f"point, is far above the best, {lowest:.4g} (epoch {best['epoch']}); "
                      f"lower --lr or set --clip-norm and train again", stacklevel=2)
