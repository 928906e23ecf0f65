r"""The optimizers' updates written as tensor operations, so that the compiled training step
(:mod:`zoo.compiled`) records them with the loss and its gradients: one graph per step instead of
a graph and then torch's optimizer. They do what torch's optimizers do, and keep their state in
the optimizer's own ``state`` (so checkpoints and ``load_state_dict`` are unchanged):

- ``adam`` (and ``adamw``, Adam with decoupled weight decay ``decoupled_weight_decay``), at
  step t with gradient g, learning rate lr and weight decay lambda:

      g <- g + lambda theta                                   (Adam's L2 penalty)
      theta <- theta (1 - lr lambda)                          (AdamW's decay instead)
      m <- beta_1 m + (1 - beta_1) g,   v <- beta_2 v + (1 - beta_2) g^2
      theta <- theta - lr / (1 - beta_1^t) * m / (sqrt(v) / sqrt(1 - beta_2^t) + eps)

- ``sgd`` without momentum: g <- g + lambda theta, theta <- theta - lr g.

Before the update the gradients are clipped to a global norm ``clip_norm`` when it is given,
g <- g min(1, clip_norm / (||g|| + 1e-6)), as ``torch.nn.utils.clip_grad_norm_`` does. A loss
that is not finite takes no step: every write is ``where(finite, new, old)``.

The scalars of a step that change from step to step (lr, the bias corrections) are inputs of the
graph, computed here in Python (:func:`step_rates`): a recording keeps working while the
schedule moves the learning rate, and the compiled kernel does not recompute
``beta_1^t`` for each element.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

CLIP_EPS = 1e-6
"""Added to the gradients' norm before clipping, as ``torch.nn.utils.clip_grad_norm_`` does."""


def unsupported(optimizer: torch.optim.Optimizer) -> str | None:
    """Why the compiled step cannot record ``optimizer``'s update, or None when it can."""
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD):
        return f"the optimizer {type(optimizer).__name__} has no recorded update"
    for group in optimizer.param_groups:
        flags = ["amsgrad", "maximize", "nesterov", "differentiable"]
        if any(group.get(flag) for flag in flags) or group.get("momentum", 0) != 0:
            return "the optimizer's options (amsgrad, maximize, momentum) have no recorded update"
    return None


def settings(optimizer: torch.optim.Optimizer) -> tuple:
    """The optimizer's constants, which a recording holds: its kind and each group's options
    other than the learning rate."""
    return (type(optimizer).__name__, tuple(
        tuple(sorted((name, repr(value)) for name, value in group.items()
                     if name not in ("params", "lr"))) for group in optimizer.param_groups))


def is_adam(optimizer: torch.optim.Optimizer) -> bool:
    return isinstance(optimizer, torch.optim.Adam)


def state_size(optimizer: torch.optim.Optimizer) -> int:
    """How many tensors of state :func:`state_of` gives for each parameter."""
    return 3 if is_adam(optimizer) else 0


def state_of(optimizer: torch.optim.Optimizer, parameter: Tensor) -> list[Tensor]:
    """The tensors the update of ``parameter`` reads and writes: Adam's ``exp_avg``,
    ``exp_avg_sq`` and ``step``, created as torch creates them on a first step; none for SGD.
    The step count is moved to the parameter's device (torch's eager Adam keeps it on the CPU,
    and reads it from either): a CUDA graph would not replay an operation on the CPU."""
    if not is_adam(optimizer):
        return []
    state = optimizer.state[parameter]
    if not state:
        state["step"] = torch.zeros((), dtype=torch.float32, device=parameter.device)
        state["exp_avg"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
    state["step"] = state["step"].to(parameter.device)
    return [state["exp_avg"], state["exp_avg_sq"], state["step"]]


def step_rates(optimizer: torch.optim.Optimizer, device: torch.device) -> Tensor:
    """``[groups, 3]``: each group's learning rate, Adam's step size lr / (1 - beta_1^t) and
    sqrt(1 - beta_2^t) for the step t about to be taken (1 and 1 for SGD)."""
    rows = []
    for group in optimizer.param_groups:
        lr, step_size, correction = group["lr"], group["lr"], 1.0
        if is_adam(optimizer):
            beta1, beta2 = group["betas"]
            t = _steps_taken(optimizer, group) + 1
            step_size, correction = lr / (1 - beta1**t), math.sqrt(1 - beta2**t)
        rows.append([lr, step_size, correction])
    return torch.tensor(rows, dtype=torch.float32, device=device)


def _steps_taken(optimizer: torch.optim.Optimizer, group: dict) -> int:
    """Adam's step count of the group (that of its first parameter with a state)."""
    for parameter in group["params"]:
        state = optimizer.state.get(parameter)
        if state:
            return int(state["step"])
    return 0


def clip(gradients: list[Tensor | None], clip_norm: float | None) -> list[Tensor | None]:
    """The gradients scaled to a global norm of at most ``clip_norm`` (unchanged when None)."""
    if clip_norm is None:
        return gradients
    present = [gradient for gradient in gradients if gradient is not None]
    total = torch.stack([gradient.square().sum() for gradient in present]).sum().sqrt()
    factor = torch.clamp(clip_norm / (total + CLIP_EPS), max=1.0)
    return [None if gradient is None else gradient * factor for gradient in gradients]


def update(optimizer: torch.optim.Optimizer, group: dict, parameter: Tensor, gradient: Tensor,
           state: list[Tensor], rates: Tensor, finite: Tensor) -> None:
    """Write the update of ``parameter`` (and of its ``state``) in place, with the group's
    options and its row of :func:`step_rates`; no change where ``finite`` is false."""
    lr, step_size, correction = rates.unbind()
    decay = group["weight_decay"]
    if decay and not group.get("decoupled_weight_decay", False):
        gradient = gradient + decay * parameter
    if not is_adam(optimizer):
        new = parameter - lr * gradient
    else:
        exp_avg, exp_avg_sq, step = state
        beta1, beta2 = group["betas"]
        m = exp_avg.lerp(gradient, 1 - beta1)
        v = exp_avg_sq * beta2 + (1 - beta2) * gradient * gradient
        base = parameter * (1 - lr * decay) if group.get("decoupled_weight_decay") else parameter
        new = base - step_size * m / (v.sqrt() / correction + group["eps"])
        exp_avg.copy_(torch.where(finite, m, exp_avg))
        exp_avg_sq.copy_(torch.where(finite, v, exp_avg_sq))
        step.add_(finite.to(step.dtype))
    parameter.copy_(torch.where(finite, new, parameter))
