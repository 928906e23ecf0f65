"""Optimizers and learning-rate schedules, and :func:`minimize`, the one optimization loop of
the zoo outside training (:func:`zoo.train.fit`, whose step uses the same optimizers): the
per-point guides of the gap decomposition and the refinement of mixture initializations."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

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
``plateau`` is constant between the plateaus of the loss, where
:func:`zoo.convergence.lr_factor` halves it."""


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float, *factors: float) -> None:
    """Set each parameter group's learning rate to ``lr`` times its ``step_scale`` (1 when it
    has none) times ``factors``, multiplied in that order."""
    for group in optimizer.param_groups:
        rate = lr * group.get("step_scale", 1.0)
        for factor in factors:
            rate = rate * factor
        group["lr"] = rate


def minimize(loss: Callable[[], torch.Tensor], parameters: Iterable[torch.Tensor], *,
             steps: int, lr: float, schedule: str = "constant",
             on_step: Callable[[], object] | None = None) -> None:
    """Adam on ``parameters`` for ``steps`` full-batch steps of ``loss()`` (a scalar), with the
    learning rate lr_t = ``lr`` * f(t / ``steps``) at step t, f the schedule
    (:data:`LR_SCHEDULES`); ``on_step`` is called after each step (a progress bar's update).
    Gradients are recorded whatever the caller's mode; the parameters are changed in place."""
    optimizer = torch.optim.Adam(parameters, lr=lr)
    factor = LR_SCHEDULES[schedule]
    with torch.enable_grad():
        for step in range(steps):
            set_learning_rate(optimizer, lr, factor(step / steps))
            optimizer.zero_grad(set_to_none=True)
            loss().backward()
            optimizer.step()
            if on_step is not None:
                on_step()
