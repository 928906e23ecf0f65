"""When training stops improving, and how a run ended.

Training to convergence (``TrainSettings.tolerance``) measures after each epoch how much the
loss on the whole training set still improves per epoch (:func:`improvement`); the plateau
schedule halves the learning rate at each plateau (:func:`lr_factor`) and training stops at the
plateau reached at the smallest rate (:func:`converged`). :func:`convergence` summarizes how a
run ended, and the two warnings say when it ended badly.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zoo.settings import TrainSettings

PLATEAU_HALVINGS = 5
"""The ``plateau`` schedule halves the learning rate at each plateau of the loss, at most this
many times; training to convergence stops at the plateau reached at the smallest rate."""


def improvement(losses: Sequence[float], patience: int) -> float | None:
    """How much the loss still improves per epoch, smoothed over epochs.

    With l_e the loss at the end of epoch e (nats per data point), E epochs done and
    P = ``patience``: the mean of l over epochs E - 2P + 1 .. E - P minus its mean over
    E - P + 1 .. E, divided by the P epochs between them. Positive while training improves the
    loss; None before 2 P epochs.

    Training to convergence measures l_e as the loss on the whole training set with the same
    random draws at every epoch (:func:`zoo.evaluate.average_loss` with the run's seed, the
    ``fit_loss`` column): the differences between epochs are then those of the parameters, not
    of the draws, so a slow improvement stands out of the noise that a minibatch average over
    an epoch carries.
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


def warn_if_not_converged(history: Sequence[dict[str, Any]], settings: TrainSettings,
                          total_steps: int, run_dir: Path | None) -> None:
    """Warn when training to convergence used its budget of ``total_steps`` first, naming the
    flag that gives it more room."""
    if settings.tolerance is None or converged(history, settings):
        return
    rate = history[-1]["improvement"]
    still = ("" if rate is None else
             f" (the loss still improves by {rate:.2g} nats per point per epoch)")
    warnings.warn(f"training used its budget of {total_steps} steps without converging to "
                  f"--tolerance {settings.tolerance:g}{still}; give it more room with "
                  f"--max-steps {2 * total_steps}"
                  + (f" (or zoo train --resume {run_dir} --steps {2 * total_steps})"
                     if run_dir is not None else ""), stacklevel=2)
