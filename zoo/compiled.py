r"""The compiled training step: the loss of model, guide and objective, its gradients and the
optimizer's update, captured once per batch shape and run as one compiled graph.

An eager step of a small VAE is a few hundred Python calls (Pyro's effect handlers and traces,
distribution objects, the objective's bookkeeping), autograd's backward pass, and then the
optimizer. The compiled step records the tensor operations of all of it once, as one function

    step(theta, b, s, r, beta, x) -> (loss, d loss / d theta),  updating theta and s in place,

of the parameters theta, the buffers b, the optimizer's state s (Adam's moments and step
count, in the optimizer's own ``state``), the step's rates r (learning rates and Adam's bias
corrections, :func:`zoo.updates.step_rates`, inputs so that the schedule moves them without a
new capture), the KL weight beta (an input for the same reason, so annealing works) and the
batch x (``[N, ...]`` each), with ``torch.fx.experimental.proxy_tensor.make_fx`` over
``torch.func.functional_call`` of ``objective(model, guide)``, then
:func:`zoo.updates.update`. The loss is that of :func:`zoo.train.eager_step`, per data point;
the backward pass is part of the recording, and so are the gradient hooks through which PIWAE
and DReG route different gradients to model and guide, the clipping of the gradients' norm, and
"no step when the loss is not finite". ``torch.compile`` (inductor) then fuses the recording
into a few loops; on CUDA the compiled step is captured as a CUDA graph and replayed, one
launch per step. The random draws are operations
of the graph that draw from torch's generator exactly as the eager loss does (inductor's
``fallback_random``), so the same seed gives the same draws and a resumed run continues the same
stream. ``torch.compile`` applied to the loss directly breaks its graph at Pyro's handlers and
runs slower than eager.

A recording fixes every Python decision made while it was taken, so the step is checked:

- a model or guide that reads a tensor's value in Python (``if x.sum() > 0``, ``.item()``)
  cannot be recorded (``make_fx`` refuses it), and trains eagerly;
- the first batch of each shape, and every ``VERIFY_EVERY``-th step after it, runs the eager
  loss and gradients as well, from the same random state, and the compiled loss and gradients
  must agree with them to float rounding (``TOLERANCE``); a model that branches on the step or
  on the data fails this check: that step is taken again eagerly from the state before it, and
  training goes on eagerly. A check that passes does not change what training draws or
  computes;
- a recording is kept (in a cache shared by the runs of a process) under a key of the source
  files of every module class of model and guide, the objective and its settings, the modules'
  scalar settings, the optimizer's constants, the shapes of parameters and batch, read when
  training starts: a student who edits a model file and trains again gets a fresh capture.

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
import torch._inductor
from torch import Tensor
from torch.func import functional_call
from torch.fx.experimental.proxy_tensor import make_fx

from zoo import updates
from zoo.objectives import Objective

STEPS = ("auto", "compiled", "eager")
"""The values of ``TrainSettings.step`` (``--compile``, ``--eager``; default ``auto``)."""

COMPILE_MIN_STEPS = 10_000
"""``auto`` compiles runs of at least this many steps. Compiling the whole step of the MNIST VAE
(loss, gradients and Adam) took 14-24 s on this project's 2-core machine (up to 80 s when it is
busy; less with inductor's on-disk cache warm) and saves about 5 ms per step at batch 20, most
of it Python: 3,000-16,000 steps to repay it. The default MNIST VAE run (10 epochs at batch 20,
30,000 steps) is compiled; the demo's runs are not."""

VERIFY_EVERY = 1000
"""Steps between two checks of the compiled step against the eager one (after the first)."""

TOLERANCE = 1e-3
"""The compiled loss must agree with the eager one within this share of its magnitude, and each
gradient within this share of the largest eager gradient entry of any parameter: float rounding
of reordered sums is far below it, a branch taken otherwise far above. (Not of the gradient's
own magnitude: near the optimum a parameter's gradient is a small difference of large terms,
such as PPCA's sigma, whose gradient -D + |x - W z|^2 / sigma^2 vanishes there, and its
rounding is a large share of what is left.)"""

log = logging.getLogger(__name__)

_GRAPHS: dict[tuple, Callable[[list[Tensor]], tuple[Tensor, list[Tensor | None]]]] = {}
"""Compiled steps by what they were recorded from (:func:`_key`, the optimizer's constants, the
batch's shapes), shared by the runs of a process."""

Step = Callable[[tuple[Tensor, ...]], Tensor]
"""One optimizer step on a batch (the tensors model and guide are called with): returns the
batch's loss per data point, detached; a loss that is not finite is returned without a step."""


def training_step(eager: Step, objective, model: torch.nn.Module, guide: torch.nn.Module,
                  optimizer: torch.optim.Optimizer, *, step: str, total_steps: int,
                  clip_norm: float | None = None, done: int = 0, budget_is_cap: bool = False
                  ) -> Step:
    """The training steps ``done``, ``done + 1``, ..., one call each: ``eager`` (a step of
    :func:`zoo.train.eager_step` over ``objective``, ``model``, ``guide`` and ``optimizer``),
    or the same step compiled (:class:`CompiledStep`) when ``step`` is ``compiled``, or
    ``auto`` for a run whose budget of ``total_steps`` is at least :data:`COMPILE_MIN_STEPS`
    (from that step on when the budget is only a cap, ``budget_is_cap``: training to
    convergence)."""
    if step == "eager":
        return eager
    if step == "auto" and total_steps < COMPILE_MIN_STEPS:
        log.info("training eagerly: %d steps are too few to repay a compilation "
                 "(auto compiles runs of %d steps or more)", total_steps, COMPILE_MIN_STEPS)
        return eager
    first = COMPILE_MIN_STEPS if step == "auto" and budget_is_cap else 0
    return CompiledStep(eager, objective, model, guide, optimizer, clip_norm=clip_norm,
                        first=first, done=done)


class CompiledStep:
    """The step ``eager`` (see :func:`training_step`) run as a compiled graph per batch shape,
    checked against the eager loss and gradients, falling back to ``eager`` with one line of
    warning (see the module's docstring); each call is one training step, the steps ``done``,
    ``done + 1``, ... of the run, eager before step ``first``. ``reason`` is None while
    compiled, else why it is eager."""

    def __init__(self, eager: Step, objective, model: torch.nn.Module, guide: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, *, clip_norm: float | None = None,
                 first: int = 0, done: int = 0):
        self.eager, self.objective, self.optimizer = eager, objective, optimizer
        self.eager_loss = partial(objective.differentiable_loss, model, guide)
        self.module = objective(model, guide)  # pyro's ELBOModule: forward = the loss
        self.first, self.step, self.clip_norm = first, done, clip_norm
        self.reason: str | None = updates.unsupported(optimizer)
        self.state = [*self.module.parameters(), *self.module.buffers()]
        position = {parameter: index for index, parameter in enumerate(self.state)}
        self.trained = [(position[parameter], group) for group in optimizer.param_groups
                        for parameter in group["params"] if parameter in position]
        if self.reason is None and len(self.trained) < sum(
                len(group["params"]) for group in optimizer.param_groups):
            self.reason = "the optimizer moves parameters outside model and guide"
        self.parameters = [self.state[index] for index, _ in self.trained]
        self.key = (_key(objective, self.module), updates.settings(optimizer), clip_norm,
                    tuple(index for index, _ in self.trained))
        self._graphs: dict[tuple, Callable] = {}
        """This run's compiled steps by the shapes of the batch (from :data:`_GRAPHS`)."""
        self._held: list[Tensor] | None = None
        if self.reason is not None:
            warnings.warn(f"training eagerly: {self.reason} (--eager skips the compiled step)",
                          stacklevel=3)

    def __call__(self, batch: tuple[Tensor, ...]) -> Tensor:
        self.step += 1
        if self.reason is not None or self.step <= self.first or not torch.is_grad_enabled():
            return self.eager(batch)
        shapes = tuple((tensor.shape, tensor.dtype, tensor.device) for tensor in batch)
        try:
            inputs = self._inputs(batch)
            if shapes not in self._graphs:
                key = (self.key, shapes)
                if key not in _GRAPHS:
                    graph, present = self._capture(inputs)
                    _GRAPHS[key] = _inductor(graph, inputs), present
                self._graphs[shapes] = _runner(*_GRAPHS[key], inputs, len(self._held))
                loss = self._checked_run(self._graphs[shapes], inputs, batch)
            elif self.step % VERIFY_EVERY == 0:
                loss = self._checked_run(self._graphs[shapes], inputs, batch)
            else:
                loss, _ = self._graphs[shapes](inputs)
        except _Fallback as fallback:
            return self._fall_back(str(fallback), batch)
        except RuntimeError as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            if "_local_scalar_dense" in message:
                message = ("the model, guide or objective reads a tensor's value in Python (a "
                           "data-dependent branch, .item()), which a recording would freeze")
            return self._fall_back(message, batch)
        return loss

    def _inputs(self, batch: Sequence[Tensor]) -> list[Tensor]:
        """The inputs of a recorded step, in one flat list: parameters and buffers, the
        optimizer's state (that of the first compiled step, which the steps write in place), the
        step's rates, the KL weight, the batch."""
        if self._held is None:
            self._held = [*(tensor.detach() for tensor in self.state), *(
                tensor for parameter in self.parameters
                for tensor in updates.state_of(self.optimizer, parameter))]
        kl_weight = (getattr(self.objective, "kl_weight", 1.0)
                     if isinstance(self.objective, Objective) else 1.0)
        device = batch[0].device
        return [*self._held, updates.step_rates(self.optimizer, device),
                torch.tensor(float(kl_weight), device=device), *batch]

    def _capture(self, inputs: list[Tensor]) -> tuple[torch.fx.GraphModule, list[bool]]:
        """The recording of one step (see the docstring of the module) from flat inputs to the
        flat outputs (loss, gradients that are not None), and which gradients are not None;
        taken on copies of the state and on a forked random stream, so that recording changes
        nothing of training's."""
        names = [*dict(self.module.named_parameters()), *dict(self.module.named_buffers())]
        groups = {id(group): index for index, group in enumerate(self.optimizer.param_groups)}
        trained, objective, module = self.trained, self.objective, self.module
        optimizer, clip_norm, present = self.optimizer, self.clip_norm, []
        size, moments, held = len(names), updates.state_size(optimizer), len(self._held)

        def step(*flat: Tensor) -> tuple[Tensor, ...]:
            state, (rates, kl_weight, *batch) = flat[:size], flat[held:]
            leaves = dict(zip(names, (value.detach() for value in state), strict=True))
            for index, _ in trained:
                leaves[names[index]].requires_grad_()
            with _kl_weight(objective, kl_weight), pyro.validation_enabled(False):
                loss = functional_call(module, leaves, tuple(batch), strict=True) / len(batch[0])
            gradients = torch.autograd.grad(loss, [leaves[names[index]] for index, _ in trained],
                                            allow_unused=True)
            with torch.no_grad():
                finite = torch.isfinite(loss)
                for number, ((index, group), gradient) in enumerate(
                        zip(trained, updates.clip(list(gradients), clip_norm), strict=True)):
                    if gradient is not None:
                        begin = size + number * moments
                        updates.update(optimizer, group, state[index], gradient,
                                       flat[begin:begin + moments], rates[groups[id(group)]],
                                       finite)
            present[:] = [gradient is not None for gradient in gradients]
            return (loss.detach(), *(gradient for gradient in gradients if gradient is not None))

        copies = [tensor.clone() for tensor in inputs]
        devices = [inputs[-1].device] if inputs[-1].device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return make_fx(step)(*copies), present

    def _checked_run(self, compiled: Callable, inputs: list[Tensor], batch: Sequence[Tensor]
                     ) -> Tensor:
        """The compiled step, after the eager loss and gradients from the same random state;
        both must give the same loss, gradients and draws (the random state after them). When
        they do not, the state before the step is restored and :class:`_Fallback` raised."""
        device = batch[0].device
        devices = [device] if device.type == "cuda" else []
        before_rng = _random_state(device)
        with torch.random.fork_rng(devices=devices):
            eager_loss = self.eager_loss(*batch) / batch[0].shape[0]
            eager_gradients = torch.autograd.grad(eager_loss, self.parameters,
                                                  allow_unused=True)
            after_eager = _random_state(device)
        saved = [tensor.clone() for tensor in self._held]
        loss, gradients = compiled(inputs)
        try:
            if not torch.equal(_random_state(device), after_eager):
                raise _Fallback("the compiled step draws other random numbers than the eager "
                                "one")
            _compare(loss, gradients, eager_loss.detach(), eager_gradients, self.parameters)
        except _Fallback:
            torch._foreach_copy_(self._held, saved)
            _set_random_state(device, before_rng)
            raise
        return loss

    def _fall_back(self, reason: str, batch: tuple[Tensor, ...]) -> Tensor:
        self.reason = reason
        warnings.warn(f"training eagerly: {reason} (--eager skips the compiled step)",
                      stacklevel=3)
        return self.eager(batch)


class _Fallback(Exception):
    """The compiled step does not reproduce the eager one."""


def _compare(loss: Tensor, gradients: Sequence[Tensor | None], eager_loss: Tensor,
             eager_gradients: Sequence[Tensor | None], parameters: Sequence[Tensor]) -> None:
    """Raise :class:`_Fallback` unless the compiled loss and gradients are the eager ones up to
    float rounding (:data:`TOLERANCE`). A loss that is not finite takes no step either way, and
    the training loop stops on it."""
    if not bool(torch.isfinite(eager_loss)) and not bool(torch.isfinite(loss)):
        return
    largest = max((float(eager.abs().max()) for eager in eager_gradients
                   if eager is not None and eager.numel()), default=0.0)
    pairs = [("the loss", loss, eager_loss, float(eager_loss.abs()))] + [
        (f"the gradient of {tuple(parameter.shape)}", gradient, eager, largest)
        for parameter, gradient, eager in zip(parameters, gradients, eager_gradients,
                                              strict=True)]
    for what, value, eager, scale in pairs:
        differs = (value is None) != (eager is None) or (
            value is not None and not _close(value, eager, scale))
        if differs:
            raise _Fallback(f"{what} of the compiled step differs from the eager one, so the "
                            f"model or guide branches on the data or on the step")


def _runner(compiled: Callable[..., Sequence[Tensor]], present: list[bool],
            inputs: list[Tensor], held: int
            ) -> Callable[[list[Tensor]], tuple[Tensor, list[Tensor | None]]]:
    """The compiled step of one run, returning the loss and the gradients, None where
    ``present`` says so; on CUDA replayed as a CUDA graph (:func:`_cuda_graph`) over the run's
    ``held`` first inputs."""
    if inputs[-1].device.type == "cuda":
        compiled = _cuda_graph(compiled, inputs, held)

    def run(inputs: list[Tensor]) -> tuple[Tensor, list[Tensor | None]]:
        with torch.no_grad():  # the recording holds its own backward pass
            outputs = compiled(*inputs)
        loss, found = outputs[0], iter(outputs[1:])
        return loss, [next(found) if exists else None for exists in present]

    return run


def _cuda_graph(compiled: Callable[..., Sequence[Tensor]], inputs: list[Tensor], held: int
                ) -> Callable[..., list[Tensor]]:
    """``compiled`` captured as one CUDA graph, so that a step is one launch. The ``held``
    first inputs (parameters, buffers, the optimizer's state) are the run's own tensors, the
    same at every step and written in place; the others (rates, KL weight, batch) are copied
    into the graph's own tensors before each replay. Captured after a warm-up on copies of the
    inputs (on a side stream, as capture requires; nothing of training's changes). A replay
    draws from torch's CUDA generator as the captured kernels did, and advances it by as much;
    its outputs are copied, the next replay overwrites them. Inductor's own CUDA graphs
    (``triton.cudagraphs``) are not used: they skip a graph that writes into its inputs unless
    dynamo marked those as parameters."""
    device = inputs[-1].device
    copies = [tensor.clone() for tensor in inputs]
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.random.fork_rng(devices=[device]), torch.cuda.stream(side), torch.no_grad():
        compiled(*copies)
    torch.cuda.current_stream(device).wait_stream(side)
    static, graph = copies[held:], torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        outputs = compiled(*inputs[:held], *static)

    def replay(*inputs: Tensor) -> list[Tensor]:
        torch._foreach_copy_(static, list(inputs[held:]))
        graph.replay()
        return [output.clone() for output in outputs]

    return replay


def _inductor(graph: torch.fx.GraphModule, inputs: list[Tensor]) -> Callable[..., Sequence[Tensor]]:
    """``graph`` compiled by inductor without dynamo (the recording is already a graph of aten
    operations, so no guards are checked on each call), its random draws left to torch's
    generator."""
    device = inputs[-1].device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return torch._inductor.compile(graph, [tensor.clone() for tensor in inputs],
                                       options={"fallback_random": True})


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


def _key(objective, module: torch.nn.Module) -> tuple:
    """What a recording depends on, besides the batch's shapes and the optimizer: the source
    files and settings of the objective and of every module class, the shapes of parameters and
    buffers. Read once per run: the code and settings of a run in progress do not
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
            state)


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


def _set_random_state(device: torch.device, state: Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _close(value: Tensor, eager: Tensor, scale: float) -> bool:
    """Whether ``value`` is ``eager`` within :data:`TOLERANCE` times ``scale`` (at least 1e-30)."""
    return bool((value - eager).abs().max() <= TOLERANCE * max(scale, 1e-30))
