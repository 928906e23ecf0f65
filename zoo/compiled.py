r"""The compiled training step: the loss of model, guide and objective with its gradients,
captured once per batch shape and run as one compiled graph.

An eager step of a small VAE is a few hundred Python calls (Pyro's effect handlers and traces,
distribution objects, the objective's bookkeeping) and then autograd's backward pass. The
compiled step records the tensor operations of all of it once, as one function

    step(theta, b, beta, x) -> (loss, d loss / d theta)

of the parameters theta, the buffers b, the KL weight beta (an input, so that annealing changes
it without a new capture) and the batch x (``[N, ...]`` each), with
``torch.fx.experimental.proxy_tensor.make_fx`` over ``torch.func.functional_call`` of
``objective(model, guide)``. The backward pass is part of the recording, and so are the
gradient hooks through which PIWAE and DReG route different gradients to model and guide.
``torch.compile`` (inductor) then fuses the recording into a few loops; on CUDA it also replays
them as a CUDA graph (one launch per step). The random draws are operations of the graph that
draw from torch's generator exactly as the eager loss does (inductor's ``fallback_random``),
so the same seed gives the same draws and a resumed run continues the same stream.
``torch.compile`` applied to the loss directly breaks its graph at Pyro's handlers and runs
slower than eager.

A recording fixes every Python decision made while it was taken, so the step is checked:

- a model or guide that reads a tensor's value in Python (``if x.sum() > 0``, ``.item()``)
  cannot be recorded (``make_fx`` refuses it), and trains eagerly;
- the first batch of each shape, and every ``VERIFY_EVERY``-th step after it, runs the eager
  loss as well, from the same random state, and the compiled loss and gradients must agree
  with it to float rounding (``TOLERANCE``); a model that branches on the step or on the data
  fails this check and trains eagerly from then on. The check does not change what training
  draws or computes: the step always uses the compiled result;
- a recording is kept (in a cache shared by the runs of a process) under a key of the source
  files of every module class of model and guide, the objective and its settings, the modules'
  scalar settings, and the shapes of parameters and batch, read when training starts: a
  student who edits a model file and trains again gets a fresh capture.

Each fallback says why in one line (a warning). Compiling takes tens of seconds on a small CPU,
so ``auto`` compiles only runs whose budget is at least ``COMPILE_MIN_STEPS`` steps and trains
shorter ones eagerly (logged at INFO on the ``zoo.compiled`` logger); a run to convergence,
whose budget is only a cap, is compiled from its step ``COMPILE_MIN_STEPS`` on, once it has
proved long. ``compiled`` compiles every step, ``eager`` none. Which steps are compiled depends
only on the settings and the step's index, so a run and its resumed continuation agree bitwise.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import pyro
import torch
from torch import Tensor
from torch.func import functional_call
from torch.fx.experimental.proxy_tensor import make_fx

from zoo.objectives import Objective

STEPS = ("auto", "compiled", "eager")
"""The values of ``TrainSettings.step`` (``--compile``, ``--eager``; default ``auto``)."""

COMPILE_MIN_STEPS = 10_000
"""``auto`` compiles runs of at least this many steps. Compiling the step of a small VAE took
6-80 s on this project's busy 2-core machine (8 s with inductor's on-disk cache warm) and saved
3-8 ms per step at batch 20, most of it Python: some 10,000 steps to repay it. The default MNIST
VAE run (10 epochs at batch 20, 30,000 steps) is compiled; the demo's runs are not."""

VERIFY_EVERY = 1000
"""Steps between two checks of the compiled step against the eager one (after the first)."""

TOLERANCE = 1e-3
"""The compiled loss and each gradient must agree with the eager ones within this share of the
eager tensor's largest magnitude: float rounding of reordered sums is far below it, a branch
taken otherwise far above."""

log = logging.getLogger(__name__)

_GRAPHS: dict[tuple, Callable[..., tuple[Tensor, list[Tensor | None]]]] = {}
"""Compiled steps by :func:`_key`, shared by the runs of a process."""


def step_loss(objective, model: torch.nn.Module, guide: torch.nn.Module, step: str,
              total_steps: int, *, done: int = 0, budget_is_cap: bool = False
              ) -> Callable[..., Tensor]:
    """The loss of the training steps ``done``, ``done + 1``, ..., one call each,
    ``loss(*batch)``, summed over the batch as ``objective.differentiable_loss(model, guide,
    *batch)`` returns it: eager, or compiled (:class:`CompiledLoss`) when ``step`` is
    ``compiled``, or ``auto`` for a run whose budget of ``total_steps`` is at least
    :data:`COMPILE_MIN_STEPS` (from that step on when the budget is only a cap,
    ``budget_is_cap``: training to convergence). The compiled loss's ``backward()`` delivers
    the recorded gradients to the parameters that require them."""
    eager = partial(objective.differentiable_loss, model, guide)
    if step == "eager":
        return eager
    if step == "auto" and total_steps < COMPILE_MIN_STEPS:
        log.info("training eagerly: %d steps are too few to repay a compilation "
                 "(auto compiles runs of %d steps or more)", total_steps, COMPILE_MIN_STEPS)
        return eager
    first = COMPILE_MIN_STEPS if step == "auto" and budget_is_cap else 0
    return CompiledLoss(objective, model, guide, first=first, done=done)


class CompiledLoss:
    """``objective.differentiable_loss(model, guide, *batch)`` run as a compiled graph per
    batch shape, checked against the eager loss, falling back to it with one line of warning
    (see the module's docstring); each call is one training step, the steps ``done``, ``done +
    1``, ... of the run, eager before step ``first``. ``reason`` is None while compiled, else
    why it is eager."""

    def __init__(self, objective, model: torch.nn.Module, guide: torch.nn.Module, *,
                 first: int = 0, done: int = 0):
        self.objective = objective
        self.eager = partial(objective.differentiable_loss, model, guide)
        self.module = objective(model, guide)  # pyro's ELBOModule: forward = the loss
        self.reason: str | None = None
        self.first, self.step = first, done
        named = dict(self.module.named_parameters())
        self.trainable = [name for name, parameter in named.items() if parameter.requires_grad]
        self.parameters = [named[name] for name in self.trainable]
        self.state = _state(self.module)
        self.key = _key(objective, self.module, self.trainable)
        self._checked: set[tuple] = set()

    def __call__(self, *batch: Tensor) -> Tensor:
        self.step += 1
        if self.reason is not None or self.step <= self.first or not torch.is_grad_enabled():
            return self.eager(*batch)
        key = (self.key, tuple((tensor.shape, tensor.dtype, tensor.device) for tensor in batch))
        try:
            if key not in _GRAPHS:
                _GRAPHS[key] = _compile(
                    _capture(self.objective, self.module, self.trainable, batch),
                    batch[0].device)
            compiled = partial(_GRAPHS[key], *_inputs(self.objective, self.state, batch))
            if key not in self._checked or self.step % VERIFY_EVERY == 0:
                loss, gradients = self._checked_run(compiled, batch)
                self._checked.add(key)
            else:
                loss, gradients = compiled()
        except _Fallback as fallback:
            return self._fall_back(str(fallback), batch)
        except RuntimeError as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            if "_local_scalar_dense" in message:
                message = ("the model, guide or objective reads a tensor's value in Python (a "
                           "data-dependent branch, .item()), which a recording would freeze")
            return self._fall_back(message, batch)
        return _WithGradients.apply(loss, gradients, *self.parameters)

    def _checked_run(self, compiled: Callable, batch: Sequence[Tensor]
                     ) -> tuple[Tensor, list[Tensor | None]]:
        """The compiled step, after the eager one from the same random state; both must give
        the same loss, gradients and draws (the random state after them)."""
        devices = [batch[0].device] if batch[0].device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            eager_loss = self.eager(*batch)
            eager_gradients = torch.autograd.grad(eager_loss, self.parameters,
                                                  allow_unused=True)
            after_eager = _random_state(batch[0].device)
        loss, gradients = compiled()
        if not torch.equal(_random_state(batch[0].device), after_eager):
            raise _Fallback("the compiled step draws other random numbers than the eager one")
        pairs = [("the loss", loss, eager_loss.detach())] + [
            (f"the gradient of {tuple(parameter.shape)}", gradient, eager)
            for parameter, gradient, eager in zip(self.parameters, gradients, eager_gradients,
                                                  strict=True)]
        for what, value, eager in pairs:
            if (value is None) != (eager is None) or value is not None and not _close(value,
                                                                                       eager):
                raise _Fallback(f"{what} of the compiled step differs from the eager one, so "
                                f"the model or guide branches on the data or on the step")
        return loss, gradients

    def _fall_back(self, reason: str, batch: Sequence[Tensor]) -> Tensor:
        self.reason = reason
        warnings.warn(f"training eagerly: {reason} (--eager skips the compiled step)",
                      stacklevel=3)
        return self.eager(*batch)


class _Fallback(Exception):
    """The compiled step does not reproduce the eager one."""


class _WithGradients(torch.autograd.Function):
    """A loss whose backward pass hands the recorded gradients to ``parameters``, times the
    incoming gradient (a scalar: the engine's 1 / batch size)."""

    @staticmethod
    def forward(ctx, loss: Tensor, gradients: list[Tensor | None], *parameters: Tensor
                ) -> Tensor:
        ctx.gradients = gradients
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        present = [gradient for gradient in ctx.gradients if gradient is not None]
        scaled = iter(torch._foreach_mul(present, grad_output))  # one call for all
        return (None, None, *(None if gradient is None else next(scaled)
                              for gradient in ctx.gradients))


def _state(module: torch.nn.Module) -> list[Tensor]:
    """The parameters and buffers of ``module``, in the order of the recording's inputs."""
    return [*module.parameters(), *module.buffers()]


def _inputs(objective, state: list[Tensor], batch: Sequence[Tensor]) -> list:
    """The inputs of a recorded step: parameters and buffers, the KL weight, the batch."""
    kl_weight = getattr(objective, "kl_weight", 1.0) if isinstance(objective, Objective) else 1.0
    return [[tensor.detach() for tensor in state],
            torch.tensor(float(kl_weight), device=batch[0].device), *batch]


def _capture(objective, module: torch.nn.Module, trainable: list[str], batch: Sequence[Tensor]
             ) -> torch.fx.GraphModule:
    """The recording of step(theta, b, beta, x) -> (loss, gradients) (see the docstring of the
    module), taken on a forked random stream so that recording draws nothing from training's."""
    names = [*dict(module.named_parameters()), *dict(module.named_buffers())]

    def step(state: list[Tensor], kl_weight: Tensor, *inputs: Tensor):
        leaves = dict(zip(names, (value.detach() for value in state), strict=True))
        for name in trainable:
            leaves[name].requires_grad_()
        with _kl_weight(objective, kl_weight), pyro.validation_enabled(False):
            loss = functional_call(module, leaves, tuple(inputs), strict=True)
        gradients = torch.autograd.grad(loss, [leaves[name] for name in trainable],
                                        allow_unused=True)
        return loss.detach(), list(gradients)

    devices = [batch[0].device] if batch[0].device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        return make_fx(step)(*_inputs(objective, _state(module), batch))


def _compile(graph: torch.fx.GraphModule, device: torch.device
             ) -> Callable[..., tuple[Tensor, list[Tensor | None]]]:
    """The recorded step compiled by inductor, random draws left to torch's generator; on
    CUDA replayed as a CUDA graph, its outputs copied before the next replay overwrites them."""
    options = {"fallback_random": True, "triton.cudagraphs": device.type == "cuda"}
    compiled = torch.compile(graph, fullgraph=True, dynamic=False, options=options)

    def run(*inputs) -> tuple[Tensor, list[Tensor | None]]:
        with torch.no_grad():  # the recording holds its own backward pass
            loss, gradients = compiled(*inputs)
        if device.type == "cuda":
            loss, gradients = loss.clone(), [g if g is None else g.clone() for g in gradients]
        return loss, gradients

    return run


@contextmanager
def _kl_weight(objective, kl_weight: Tensor):
    """The objective's KL weight as the graph's input while recording (zoo's objectives)."""
    if not isinstance(objective, Objective):
        yield
        return
    before, objective.kl_weight = objective.kl_weight, kl_weight
    try:
        yield
    finally:
        objective.kl_weight = before


def _key(objective, module: torch.nn.Module, trainable: list[str]) -> tuple:
    """What a recording depends on, besides the batch's shapes: the source files and settings
    of the objective and of every module class, the shapes of parameters and buffers, and which
    parameters train. Read once per run: the code and settings of a run in progress do not
    change (the periodic check would notice)."""
    classes = {cls for submodule in module.modules() for cls in type(submodule).__mro__}
    classes |= set(type(objective).__mro__)
    files = sorted({_source_file(cls) for cls in classes} - {None})
    sources = hashlib.sha256()
    for path in files:
        with open(path, "rb") as file:
            sources.update(path.encode() + b"\0" + file.read())
    settings = tuple((name, type(submodule).__qualname__, _settings(submodule))
                     for name, submodule in module.named_modules())
    state = tuple((name, tuple(tensor.shape), tensor.dtype, tensor.device.type)
                  for name, tensor in (*module.named_parameters(), *module.named_buffers()))
    return (sources.hexdigest(), type(objective).__qualname__, _settings(objective), settings,
            state, tuple(trainable))


def _source_file(cls: type) -> str | None:
    try:
        return inspect.getsourcefile(cls)
    except TypeError:  # built-in classes
        return None


def _settings(thing: Any) -> tuple:
    """The plain settings of an object (numbers, strings, tuples) and digests of its plain
    tensor attributes, which a recording holds as constants; not the KL weight, an input."""
    items = []
    for name, value in sorted(vars(thing).items()):
        if name.startswith("_") or name == "kl_weight":
            continue
        if isinstance(value, Tensor):
            value = hashlib.sha256(value.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        if value is None or isinstance(value, (bool, int, float, str, tuple)):
            items.append((name, repr(value)))
    return tuple(items)


def _random_state(device: torch.device) -> Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _close(value: Tensor, eager: Tensor) -> bool:
    return bool((value - eager).abs().max() <= TOLERANCE * eager.abs().max().clamp(min=1e-30))
