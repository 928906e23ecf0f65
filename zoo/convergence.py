"""When training stops improving, and how a run ended.

Training to convergence (``TrainSettings.tolerance``) measures after each epoch the loss on
the whole training set. The plateau schedule halves the learning rate at each plateau, where two
short windows of epochs show no improvement (:func:`improvement`, :func:`lr_factor`); training
stops at the smallest rate once a longer window shows, with its noise accounted for, that the
loss improves by less than the tolerance per epoch (:func:`trend`, :func:`converged`).
:func:`convergence` summarizes how a run ended, and the two warnings say when it ended badly.

A model may know how to tell a false stop, such as a saddle point, from its optimum
(``ModelEntry.before_stop``): when the rule would stop there, the model steps off it, the
epoch's row records ``escaped``, and training goes on as from a fresh start, at the full
learning rate; every test above reads only the rows since the last escape
(:func:`since_escape`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scipy.stats import linregress
from scipy.stats import t as student_t

if TYPE_CHECKING:
    from zoo.settings import TrainSettings

CONFIDENCE = 0.99
"""How sure training to convergence must be that the loss improves by less than the tolerance
per epoch before it stops (:func:`converged`)."""

PLATEAU_HALVINGS = 3
"""The ``plateau`` schedule halves the learning rate at each plateau of the loss, at most this
many times; training to convergence stops only at the smallest rate."""


MAX_ESCAPES = 3
"""How many times training to convergence asks the model to leave a false stop; after that it
stops where the rule says. A move can be undone by the objective itself (an importance-weighted
bound does not pull PPCA's W to the orthogonal columns the mean-field guide needs, so W mixes
again after each rotation), and training must end."""


def escaped(row: dict[str, Any]) -> bool:
    """Whether the epoch of ``row`` left a false stop: ``escaped`` is 1 (absent, None or
    metrics.csv's nan otherwise)."""
    return row.get("escaped") == 1


def escapes(history: Sequence[dict[str, Any]]) -> int:
    """How many epochs of ``history`` left a false stop (:func:`escaped`)."""
    return sum(map(escaped, history))


def since_escape(history: Sequence[dict[str, Any]]) -> Sequence[dict[str, Any]]:
    """The rows of ``history`` after the last one that left a false stop (:func:`escaped`);
    all of them if none did."""
    for index in range(len(history) - 1, -1, -1):
        if escaped(history[index]):
            return history[index + 1:]
    return history


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
    that epoch ended a plateau (at most ``PLATEAU_HALVINGS`` times); 1 for other schedules,
    and after an epoch that left a false stop."""
    if not history or escaped(history[-1]):
        return 1.0
    factor = history[-1].get("lr_factor", 1.0)
    halve = (settings.lr_schedule == "plateau" and _plateau(history, settings)
             and factor > 2.0**-PLATEAU_HALVINGS)
    return factor / 2 if halve else factor


def converged(history: Sequence[dict[str, Any]], settings: TrainSettings) -> bool:
    """Whether training to convergence (``settings.tolerance``) has stopped improving: at the
    plateau schedule's smallest learning rate (at any rate for the other schedules), with at
    least 4 ``patience`` epochs at that rate, the improvement per epoch over the second half of
    them (:func:`settling`, at least 3) is below the tolerance with confidence
    :data:`CONFIDENCE`: the estimate r plus t s < tolerance, with s its standard error and t the
    one-sided quantile of Student's t with n - 2 degrees of freedom for n epochs."""
    if settings.tolerance is None or not history or escaped(history[-1]):
        return False
    factor = history[-1].get("lr_factor", 1.0)
    if settings.lr_schedule == "plateau" and factor > 2.0**-PLATEAU_HALVINGS:
        return False
    measured = settling(history)
    at_rate = sum(row.get("lr_factor", 1.0) == factor for row in since_escape(history))
    if measured is None or at_rate < 4 * settings.patience:
        return False
    rate, standard_error, epochs = measured
    bound = rate + float(student_t.ppf(CONFIDENCE, epochs - 2)) * standard_error
    return bound < settings.tolerance


def settling(history: Sequence[dict[str, Any]]) -> tuple[float, float, int] | None:
    """The improvement per epoch of the whole-data loss (``fit_loss``) over the second half of
    the epochs at the last learning rate (since the last escape from a false stop), its
    standard error (:func:`trend`) and the number of epochs in that half; None before 6 epochs
    at that rate. The second half leaves out the fast change that follows a new rate."""
    if not history or "fit_loss" not in history[-1]:
        return None
    factor = history[-1].get("lr_factor", 1.0)
    losses = [row["fit_loss"] for row in since_escape(history)
              if row.get("lr_factor", 1.0) == factor]
    if len(losses) < 6:
        return None
    half = losses[len(losses) // 2:]
    return (*trend(half), len(half))


def trend(losses: Sequence[float]) -> tuple[float, float]:
    """The least-squares improvement per epoch of ``losses`` (one per epoch, at least 3), and
    its standard error.

    With l_e the loss at epoch e = 1..n, the line l_e = a - r e fitted by least squares gives
    the improvement r = -sum_e (e - e_bar)(l_e - l_bar) / S with S = sum_e (e - e_bar)^2, and
    its standard error sqrt(s^2 / S), s^2 the residuals' sum of squares over n - 2
    (``scipy.stats.linregress``).

    A plateau test that compares two short windows (:func:`improvement`) is enough to lower
    the learning rate, but not to stop: where the posterior is much narrower than the prior,
    the loss moves from epoch to epoch by far more than the tolerance (the parameters jitter
    under Adam's steps) while a slow direction still improves it by more than the tolerance
    per epoch. Training stops only once the improvement is below the tolerance with its
    noise accounted for, which takes more epochs the noisier the loss.
    """
    line = linregress(range(len(losses)), losses)
    return -float(line.slope), float(line.stderr)


def convergence(history: Sequence[dict[str, Any]], settings: TrainSettings) -> dict[str, Any]:
    """How a run ended: ``converged`` (None for a fixed budget), ``steps`` done, the
    ``improvement`` per epoch (nats per data point) and its ``standard_error`` that the last
    convergence check measured (:func:`settling`; None before it could, and for a fixed
    budget), the ``tolerance``, and how many times training left a false stop
    (``escapes``); config.json, ``zoo evaluate --json`` and the report show it."""
    measured = settling(history) if settings.tolerance is not None else None
    rate, standard_error, _ = measured or (None, None, None)
    return {"converged": None if settings.tolerance is None else converged(history, settings),
            "steps": history[-1]["step"] if history else 0,
            "improvement": rate, "standard_error": standard_error,
            "tolerance": settings.tolerance,
            "escapes": escapes(history)}


def describe_convergence(summary: dict[str, Any]) -> str:
    """One line for a :func:`convergence` summary."""
    steps, rate, tolerance = summary["steps"], summary["improvement"], summary["tolerance"]
    if summary["converged"] is None:
        return f"training: a fixed budget of {steps} steps"
    error = summary.get("standard_error")
    still = ("" if rate is None else f", improving by {rate:.2g}"
             + ("" if error is None else f" +- {error:.2g}") + " nats per point per epoch")
    escapes = summary.get("escapes", 0)
    still += ("" if not escapes else
              f"; it left a false stop {escapes} time{'s' if escapes > 1 else ''}")
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
    rate = (settling(history) or (None,))[0]
    still = ("" if rate is None else
             f" (the loss still improves by {rate:.2g} nats per point per epoch)")
    warnings.warn(f"training used its budget of {total_steps} steps without converging to "
                  f"--tolerance {settings.tolerance:g}{still}; give it more room with "
                  f"--max-steps {2 * total_steps}"
                  + (f" (or zoo train --resume {run_dir} --steps {2 * total_steps})"
                     if run_dir is not None else ""), stacklevel=2)
