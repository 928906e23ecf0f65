"""How to train: :class:`TrainSettings`, the settings of :func:`zoo.train.fit` and of the
``train`` section of a run's configuration, each checked where it is made."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from zoo.compiled import STEPS
from zoo.errors import ZooError
from zoo.optimize import LR_SCHEDULES, OPTIMIZERS


@dataclass
class TrainSettings:
    """How to train. ``steps``, when given, overrides ``epochs`` (the last epoch may be partial).

    ``lr_schedule`` is ``constant``, ``cosine``: lr_t = lr (1 + cos(pi t / T)) / 2 at step t of
    T, which lets stochastic gradients settle at the optimum instead of jittering around it, or
    ``plateau`` (needs ``tolerance``): lr halved each time the loss stops improving by
    ``tolerance`` per epoch over ``patience`` epochs, down to lr / 2^3
    (:data:`zoo.convergence.PLATEAU_HALVINGS`), the same settling without a fixed number of
    steps.
    ``clip_norm`` clips the global gradient norm; ``device`` is ``cpu``, ``cuda`` or ``auto``.
    ``freeze_model`` trains the guide alone, with the model's parameters held where they are.
    ``step`` is ``auto`` (compiled for runs long enough to repay the compilation), ``compiled``
    or ``eager`` (:func:`zoo.compiled.training_step`).

    ``passes`` is the number of passes over the training data in one epoch, the unit of the
    ``epochs`` budget, of the rows of metrics.csv, of checkpoints and of the convergence checks
    below; more than one suits full-batch training of small data, whose passes are single steps
    too short to check and save after each.

    ``tolerance``, when given, trains to convergence: training stops before the budget of
    ``steps`` (or ``epochs``) once the loss on the whole training set improves by less than
    ``tolerance`` nats per data point per epoch with 99% confidence, measured over the second
    half of at least 4 ``patience`` epochs (:func:`zoo.convergence.converged`; with the plateau
    schedule, at its smallest learning rate); without it the budget is a fixed number of
    steps. ``average_iterates`` ends each epoch at the mean of its iterates (Polyak
    averaging), which removes most of the jitter of Adam's steps from the parameters and from
    the loss the convergence checks measure. ``threads`` is the number of CPU threads torch
    uses during training (None: torch's default).
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
    passes: int = 1
    threads: int | None = None
    average_iterates: bool = False
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
            (self.passes >= 1, f"passes must be at least 1; got {self.passes}"),
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

    def steps_per_epoch(self, num_train: int) -> int:
        """The optimizer steps of one epoch on ``num_train`` data points:
        ``passes`` ceil(N / min(batch_size, N))."""
        return self.passes * math.ceil(num_train / min(self.batch_size, num_train))

    def total_steps(self, num_train: int) -> int:
        """The optimizer steps of the whole run on ``num_train`` data points: ``steps``, else
        ``epochs`` times the steps of one epoch."""
        return self.steps or self.epochs * self.steps_per_epoch(num_train)
