"""The training engine shared by every model, guide and objective.

One loop: the data stay in memory as tensors, each epoch visits them in a fresh random order
in index-based minibatches, and each step (:func:`eager_step`, or another :data:`StepFactory`
given to :func:`fit`) minimizes

    loss = objective.differentiable_loss(model, guide, *batch) / batch_size,

the objective in nats per data point, with a torch optimizer over the parameters of model and
guide. :func:`fit` is that loop; the extras are composed around the step: the compiled step
(:func:`zoo.compiled.training_step`), the learning-rate schedule and its plateaus
(:mod:`zoo.optimize`, :mod:`zoo.convergence`), KL annealing (``set_progress``), the progress
bar, the checks for non-finite values, the whole-data losses, metrics.csv and the checkpoints.

A run is reproducible from its seed: with the same seed, a CPU run gives bitwise the same
parameters, and a run stopped after any epoch and resumed from its checkpoint ends where
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

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.distributions import is_validation_enabled
from torch.nn.utils import clip_grad_norm_
from tqdm.auto import tqdm

from zoo import distributed
from zoo.compiled import Step, training_step
from zoo.convergence import (
    MAX_ESCAPES,
    converged,
    escapes,
    improvement,
    lr_factor,
    since_escape,
    warn_if_diverged,
    warn_if_not_converged,
)
from zoo.errors import ZooError
from zoo.evaluate import average_loss
from zoo.optimize import LR_SCHEDULES, make_optimizer, parameter_groups, set_learning_rate
from zoo.runs import (
    CHECKPOINT,
    append_metrics,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_metrics,
)
from zoo.settings import TrainSettings


class TrainingDiverged(ZooError):
    """The loss or its gradient stopped being finite; the last good checkpoint stays on disk."""


def _diverged(what: str, run_dir: Path | None, epoch: int) -> TrainingDiverged:
    kept = (f"the last good checkpoint (epoch {epoch - 1}) stays in {run_dir / CHECKPOINT}"
            if run_dir is not None and epoch > 1 else "no checkpoint was written")
    return TrainingDiverged(f"training stopped: {what}; {kept}. Lower --lr or set --clip-norm.")


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


def trainable_parameters(model: torch.nn.Module, guide: torch.nn.Module, freeze_model: bool
                         ) -> list[torch.nn.Parameter]:
    """The parameters training moves: the guide's, and the model's unless ``freeze_model``,
    each once. One the guide shares with the model belongs to the model: ``freeze_model`` holds
    it fixed."""
    shared = {id(parameter) for parameter in model.parameters()}
    own = [parameter for parameter in guide.parameters() if id(parameter) not in shared]
    parameters = own + ([] if freeze_model else [*model.parameters()])
    if not parameters:
        raise ZooError("--freeze-model holds the model fixed, and this guide has no parameters "
                       "of its own: there is nothing to train. Drop --freeze-model or choose a "
                       "guide with parameters" if freeze_model else
                       "neither the model nor the guide has parameters: there is nothing to train")
    return parameters


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


StepFactory = Callable[[Callable[..., torch.Tensor], torch.optim.Optimizer,
                        list[torch.nn.Parameter], TrainSettings], Step]
"""Builds a :data:`Step` from ``loss_of(*batch)`` (the objective's loss of a batch, summed over
its points), the optimizer, the parameters it moves and the settings: :func:`eager_step`, or
another way to take the same step (compiled, say), passed to :func:`fit` as ``make_step``."""


def eager_step(loss_of: Callable[..., torch.Tensor], optimizer: torch.optim.Optimizer,
               parameters: list[torch.nn.Parameter], settings: TrainSettings) -> Step:
    """The training step: zero the gradients, compute the loss, backpropagate, step.

    The loss of a batch of B points is loss_of(batch) / B; under several processes each computes
    its share (:func:`zoo.distributed.share_loss`) and the gradients and losses are summed over
    them (:func:`zoo.distributed.sum_gradients`). The global gradient norm is clipped to
    ``settings.clip_norm`` when it is given. The optimizer's learning rates are set by the loop
    around the step.
    """
    def step(batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        loss = distributed.share_loss(loss_of, batch) / batch[0].shape[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        loss = distributed.sum_gradients(parameters, loss)
        if not bool(torch.isfinite(loss)):
            return loss
        if settings.clip_norm is not None:
            clip_grad_norm_(parameters, settings.clip_norm)
        optimizer.step()
        return loss.detach()

    return step


@dataclass
class _Training:
    """The state of one call to :func:`fit`: what it trains, on what, and how far it got."""

    model: torch.nn.Module
    guide: torch.nn.Module
    objective: Any
    train: tuple[torch.Tensor, ...]
    test: tuple[torch.Tensor, ...] | None
    settings: TrainSettings
    run_dir: Path | None
    parameters: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    batch_size: int
    total_steps: int
    loss_of: Callable[..., torch.Tensor] | None = None
    """The loss of a batch, summed over its points."""
    before_stop: Callable[..., bool] | None = None
    """The model's escape from a false stop, asked before training to convergence stops."""
    history: list[dict[str, Any]] = field(default_factory=list)
    step: int = 0
    first_step: int = 0
    """The step at which this call started: Pyro's argument checks run there only."""
    validate: bool = True
    """Whether Pyro's argument checks were on when the call started."""

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps or converged(self.history, self.settings)


def _batches(data: Sequence[torch.Tensor], batch_size: int, passes: int
             ) -> Iterator[tuple[int, tuple[torch.Tensor, ...]]]:
    """``passes`` passes over ``data`` in batches of ``batch_size`` rows, each pass in a new
    random order drawn from torch's generator: pairs (first row of the batch in its pass,
    batch)."""
    num_rows = data[0].shape[0]
    for _ in range(passes):
        order = torch.randperm(num_rows, device=data[0].device)
        for begin in range(0, num_rows, batch_size):
            yield begin, tuple(tensor[order[begin:begin + batch_size]] for tensor in data)


def fit(model: torch.nn.Module, guide: torch.nn.Module, objective, train: Sequence[torch.Tensor],
        *, test: Sequence[torch.Tensor] | None = None, settings: TrainSettings | None = None,
        run_dir: Path | None = None, checkpoint: dict[str, Any] | None = None,
        transform: Callable[[tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]] | None = None,
        on_epoch: Callable[[dict[str, float]], None] | None = None, desc: str = "training",
        make_step: StepFactory = eager_step,
        before_stop: Callable[..., bool] | None = None) -> list[dict[str, float]]:
    """Train ``model`` and ``guide`` on ``train`` (a tuple of tensors whose first dimension
    indexes data points, passed to model and guide as positional arguments).

    Returns the history: one dict per epoch with ``epoch``, ``step``, ``train_loss`` (mean loss
    per data point over the epoch's steps), ``test_loss`` (on ``test``, or None), ``seconds`` and
    ``improvement`` (:func:`zoo.convergence.improvement`). With ``settings.tolerance`` training
    stops once it has converged (:func:`zoo.convergence.converged`), and warns when the budget
    ends first. With ``run_dir``, each epoch appends its row to metrics.csv and replaces
    checkpoint.pt; with ``checkpoint`` (a dict from :func:`zoo.runs.load_checkpoint`), training
    continues from it. ``transform``, when given, maps ``train`` to the tensors of each new
    epoch (dynamic binarization draws fresh binary images from the grey levels this way),
    drawing from torch's generator so that resuming stays exact. An objective with a
    ``set_progress(epochs)`` method (KL annealing) is told before each step how many epochs are
    done, as a float. With ``settings.freeze_model`` only the guide's parameters are trained.
    The progress bar (unless ``settings.quiet``) is labelled ``desc``. ``make_step`` builds the
    step (:data:`StepFactory`); everything else here is the loop around it. ``before_stop(model,
    guide, *train) -> bool``, when given, is asked whenever training to convergence would stop:
    it returns True after moving model and guide off a false stop (a saddle point, say), and
    training goes on (:mod:`zoo.convergence`).
    """
    settings = settings or TrainSettings()
    with torch_threads(settings.threads):
        run = _prepare(model, guide, objective, train, test, settings, run_dir, checkpoint)
        run.before_stop = before_stop
        take_step = _training_step(run, make_step)
        bar = tqdm(total=run.total_steps, initial=run.step, unit="step", dynamic_ncols=True,
                   desc=desc, disable=settings.quiet or not distributed.is_main())
        try:
            while not run.done:
                row = _train_epoch(run, take_step, transform, bar)
                _record_epoch(run, row, checkpoint=run_dir is not None and distributed.is_main())
                if on_epoch is not None:
                    on_epoch(row)
        finally:
            bar.close()
            model.requires_grad_(True)
        warn_if_diverged(run.history)
        warn_if_not_converged(run.history, settings, run.total_steps, run_dir)
    return run.history


def _prepare(model, guide, objective, train, test, settings: TrainSettings,
             run_dir: Path | None, checkpoint: dict[str, Any] | None) -> _Training:
    """Model, guide and data on the device; the optimizer over the trained parameters; the
    state of ``checkpoint`` restored, else every generator seeded; the loss of a batch."""
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
    run = _Training(model, guide, objective, train, test, settings, run_dir, parameters,
                    optimizer, batch_size, settings.total_steps(num_train))
    if checkpoint is None:
        seed_everything(settings.seed)
    else:
        model.load_state_dict(checkpoint["model"])
        guide.load_state_dict(checkpoint["guide"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        run.history, run.step = list(checkpoint["history"]), checkpoint["step"]
        set_rng_state(checkpoint["rng"])
        if run_dir is not None and distributed.is_main():
            write_metrics(run_dir, run.history)
    run.first_step, run.validate = run.step, is_validation_enabled()
    run.loss_of = partial(objective.differentiable_loss, model, shared_guide)
    return run


def _training_step(run: _Training, make_step: StepFactory) -> Step:
    """The step ``make_step`` builds, compiled as ``settings.step`` says
    (:func:`zoo.compiled.training_step`; eager under several processes)."""
    settings = run.settings
    eager = make_step(run.loss_of, run.optimizer, run.parameters, settings)
    return training_step(eager, run.objective, run.model, run.guide, run.optimizer,
                         step=settings.step if distributed.world_size() == 1 else "eager",
                         total_steps=run.total_steps, clip_norm=settings.clip_norm,
                         done=run.step, budget_is_cap=settings.tolerance is not None)


def _train_epoch(run: _Training, take_step: Step, transform, bar) -> dict[str, Any]:
    """``passes`` passes over the training data, each in a fresh random order, in minibatches,
    up to the budget of steps. Pyro's argument checks run on the first step of :func:`fit` only; the
    learning rate of each step is lr times the plateau factor and the schedule's. With
    ``settings.average_iterates`` the epoch ends at the mean of the parameters after each of
    its steps, theta_bar = (1 / T) sum_t theta_t (Polyak averaging, restarted each epoch), which
    is nearer the optimum than the last step's theta_T when the steps jitter around it. Returns the
    epoch's row: ``epoch``, ``step``, ``train_loss`` and ``seconds`` (``test_loss`` is
    filled in by :func:`_record_epoch`)."""
    settings, num_train = run.settings, run.train[0].shape[0]
    epoch, factor = len(run.history) + 1, lr_factor(run.history, run.settings)
    schedule = LR_SCHEDULES[settings.lr_schedule]
    set_progress = getattr(run.objective, "set_progress", None)
    started = time.perf_counter()
    loss_sum, seen = torch.zeros((), device=run.train[0].device), 0
    data = run.train if transform is None else transform(run.train)
    iterate_sum = ([torch.zeros_like(parameter) for parameter in run.parameters]
                   if settings.average_iterates else None)
    first_step = run.step
    for begin, batch in _batches(data, run.batch_size, settings.passes):
        if run.step == run.total_steps:
            break
        if set_progress is not None:
            set_progress(run.step / settings.steps_per_epoch(num_train))
        set_learning_rate(run.optimizer, settings.lr, factor,
                          schedule(run.step / run.total_steps))
        with pyro.validation_enabled(run.validate and run.step == run.first_step):
            loss = take_step(batch)
        if not bool(torch.isfinite(loss)):
            raise _diverged(f"the loss is not finite at epoch {epoch}, step "
                            f"{begin // run.batch_size + 1} (step {run.step + 1} overall)",
                            run.run_dir, epoch)
        run.step += 1
        if iterate_sum is not None:
            torch._foreach_add_(iterate_sum, [parameter.detach() for parameter in run.parameters])
        loss_sum += loss * batch[0].shape[0]
        seen += batch[0].shape[0]
        bar.update()
    if iterate_sum is not None and run.step > first_step:
        with torch.no_grad():
            for parameter, total in zip(run.parameters, iterate_sum, strict=True):
                parameter.copy_(total / (run.step - first_step))
    seconds = time.perf_counter() - started
    if not all(bool(torch.isfinite(parameter).all()) for parameter in run.parameters):
        raise _diverged(f"the parameters are not finite after step {run.step} (the end of "
                        f"epoch {epoch}): a gradient was not finite", run.run_dir, epoch)
    bar.set_postfix({"epoch": epoch, "loss": f"{loss_sum.item() / seen:.4g}",
                     "items/s": f"{seen / seconds:.0f}"}, refresh=False)
    return {"epoch": epoch, "step": run.step, "train_loss": loss_sum.item() / seen,
            "test_loss": None, "seconds": seconds}


def _escape(run: _Training) -> bool:
    """Ask ``run.before_stop`` to move model and guide off a false stop; whether it did. The
    move must write the parameters in place (``parameter.copy_(value)``): the training step
    holds their storage (the compiled step's inputs, a CUDA graph's addresses), so a parameter
    given new storage, as assigning ``module.name = value`` does for a PyroParam, would go on
    being trained where it was. Such a move is refused with the parameters it replaced."""
    def storage() -> dict[str, int]:
        return {f"{part}.{name}": tensor.data_ptr()
                for part, module in (("model", run.model), ("guide", run.guide))
                for name, tensor in module.named_parameters()}

    before = storage()
    moved = run.before_stop(run.model, run.guide, *run.train)
    after = storage()
    replaced = [name for name in before if after.get(name) != before[name]]
    if replaced:
        raise ZooError(f"before_stop replaced {', '.join(replaced)} instead of writing in "
                       "place; write each parameter with parameter.copy_(value) under "
                       "torch.no_grad() (a PyroParam x through x_unconstrained)")
    return bool(moved)


def _record_epoch(run: _Training, row: dict[str, Any], *, checkpoint: bool) -> None:
    """Complete the epoch's ``row`` and append it to the history: ``test_loss`` and, when
    training to convergence, ``fit_loss``, ``lr_factor`` and ``improvement`` (over the epochs
    at this learning rate), each computed once, on rank 0, and ``escaped`` (1) when training
    would stop here and ``run.before_stop`` moved off a false stop instead (on every rank,
    from the same parameters and data); with ``checkpoint``, the row goes to metrics.csv and the
    state, after any escape, to checkpoint.pt."""
    settings, main = run.settings, distributed.is_main()
    model, guide, objective = run.model, run.guide, run.objective
    row["test_loss"] = (None if run.test is None or not main else
                        average_loss(objective, model, guide, run.test,
                                     seed=settings.seed + row["epoch"]))
    if settings.tolerance is not None:
        factor = lr_factor(run.history, settings)
        row["fit_loss"] = distributed.from_main(  # one pass, the same on every rank
            average_loss(objective, model, guide, run.train, seed=settings.seed) if main
            else None)
        row["lr_factor"] = factor
        row["improvement"] = improvement(
            [past["fit_loss"] for past in since_escape([*run.history, row])
             if past["lr_factor"] == factor], settings.patience)
        if (run.before_stop is not None and converged([*run.history, row], settings)
                and escapes(run.history) < MAX_ESCAPES and _escape(run)):
            row["escaped"] = 1
    run.history.append(row)
    if checkpoint:
        append_metrics(run.run_dir, row)
        save_checkpoint(run.run_dir, {
            "model": model.state_dict(), "guide": guide.state_dict(),
            "optimizer": run.optimizer.state_dict(), "epoch": row["epoch"], "step": run.step,
            "history": run.history, "rng": rng_state()})
    row["test_loss"] = distributed.from_main(row["test_loss"])
